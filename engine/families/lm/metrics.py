"""Language-model metrics: cross-entropy on real held-out stories, sample diversity.

test_loss    nats per token on the REAL test split: each story scored as [EOT] s [EOT],
             every story token and the closing EOT predicted
truth_loss   the same stories under the true distribution (grammar corpus only)
kl_to_truth  test_loss − truth_loss: the model's excess cross-entropy over the truth
"""
from __future__ import annotations

import json
import math
from typing import Protocol

import numpy as np
import pyarrow as pa

from engine.corpus import ROW


def story_nll(model, ids: list[list[int]], eos: int, pad: int, context: int,
              batch_tokens: int = 8192) -> np.ndarray:
    """Total negative log-likelihood (nats) of each story, scored as [EOT] s [EOT], on
    the model's device. Stories are batched by length (about `batch_tokens` tokens a
    batch) so little compute goes to padding; on a GPU the forward pass runs under bf16
    autocast where the GPU has it, and the log-softmax in fp32."""
    import torch

    device = next(model.parameters()).device
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    nll = np.zeros(len(ids))
    order = np.argsort([len(s) for s in ids], kind="stable")
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = min(len(ids[order[start]]), context - 2) + 2
            rows = max(1, batch_tokens // width)
            chunk_idx = order[start:start + rows]
            chunk = [[eos] + list(ids[i])[: context - 2] + [eos] for i in chunk_idx]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                x[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            x, mask = x.to(device), mask.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=x, attention_mask=mask).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = x[:, 1:]
            token_lp = logp.gather(2, target[..., None])[..., 0] * mask[:, 1:]
            nll[chunk_idx] = -token_lp.sum(dim=1).double().cpu().numpy()
            start += len(chunk_idx)
    return nll


def predicted_tokens(ids: list[list[int]], context: int) -> np.ndarray:
    return np.asarray([min(len(s), context - 2) + 1 for s in ids])


def test_metrics(model, test: pa.Table, eos: int, pad: int, context: int,
                 batch_tokens: int = 8192) -> dict[str, float]:
    ids = test.column("ids").to_pylist()
    nll = story_nll(model, ids, eos, pad, context, batch_tokens)
    tokens = predicted_tokens(ids, context).sum()
    metrics = {"test_loss": float(nll.sum() / tokens)}
    if "true_logprob" in test.column_names:
        truth = -float(np.sum(test.column("true_logprob").to_numpy()))
        metrics["truth_loss"] = truth / tokens
        metrics["kl_to_truth"] = metrics["test_loss"] - metrics["truth_loss"]
    return metrics


def evaluate_checkpoint(model_source: str, test: pa.Table, eos: int, pad: int, context: int,
                        threads: int) -> dict[str, float]:
    """Load a saved model where this process runs (a GPU if it has one) and score the
    real test stories. The weights are loaded in fp32: a bf16 checkpoint is upcast, so a
    CPU computes in full precision and a GPU autocasts (see story_nll)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.files import local_copy
    from engine.fit import current_device, use_threads

    use_threads(threads)
    device = current_device()
    model = AutoModelForCausalLM.from_pretrained(str(local_copy(model_source)),
                                                 dtype=torch.float32).to(device).eval()
    # A GPU takes far bigger batches than a CPU's caches like.
    return test_metrics(model, test, eos, pad, context,
                        batch_tokens=65536 if device.type == "cuda" else 8192)


# ------------------------------------------------------------ sample statistics
#
# A sampled corpus's statistics are computed batch by batch where its rows are (Ray
# Data tasks over its shards) and merged: sums exactly; distinct n-grams and distinct
# stories by 64-bit hashes kept in a KMV sketch (the SKETCH smallest distinct hashes).
# While a corpus has at most SKETCH distinct n-grams (or stories) the sketch holds them
# all and the count is exact; beyond, it estimates the count as (SKETCH - 1) / h, h the
# SKETCH-th smallest hash scaled to [0, 1): a relative standard error of about
# 1/sqrt(SKETCH) = 0.4% (Bar-Yossef et al. 2002; Beyer et al. 2007), with 64-bit hashes
# colliding with probability ~n²/2⁶⁵ (nil here). No process holds the corpus's n-grams.

# The engine's own KMV sketch, not Apache datasketches' theta sketch (the same estimator
# family): its partials are plain sorted hashes a Ray Data batch hands back as a list and
# np.unique merges, and below SKETCH distinct items it is exact, which every test and the
# quickstart's tables rely on; a theta sketch would add a compiled dependency to merge
# the same numbers.
SKETCH = 1 << 16
NGRAMS = (1, 2, 3)
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _smallest(hashes: np.ndarray) -> np.ndarray:
    unique = np.unique(hashes)
    return unique[:SKETCH]


def partial_stats(table: pa.Table) -> dict:
    """One batch of a sampled corpus (columns ids, n_tokens, logprob, finished): its
    sums and sketches."""
    lengths = table.column("n_tokens").to_numpy().astype(np.int64)
    flat = table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    tokens = flat.astype(np.uint64)
    story = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = {"rows": len(lengths), "tokens": int(lengths.sum()),
           "logprob": float(np.sum(table.column("logprob").to_numpy())),
           "finished": int(np.sum(table.column("finished").to_numpy()))}
    with np.errstate(over="ignore"):
        for n in NGRAMS:
            if len(tokens) < n:
                out[f"grams_{n}"], out[f"sketch_{n}"] = 0, np.zeros(0, np.uint64)
                continue
            starts = np.arange(len(tokens) - n + 1)
            whole = story[starts] == story[starts + n - 1]  # inside one story
            h = np.full(len(starts), np.uint64(n))
            for k in range(n):
                h = _mix(h ^ tokens[starts + k])
            out[f"grams_{n}"] = int(whole.sum())
            out[f"sketch_{n}"] = _smallest(h[whole])
        # a story's hash: of its tokens at their positions, and its length
        term = _mix(tokens ^ _mix(position.astype(np.uint64) + np.uint64(1)))
        sums = np.zeros(len(lengths), dtype=np.uint64)
        np.add.at(sums, story, term)
        out["sketch_stories"] = _smallest(_mix(sums ^ _mix(lengths.astype(np.uint64))))
    return out


def merge_stats(partials) -> dict[str, float]:
    """The corpus's statistics from its batches' partial_stats."""
    total = {"rows": 0, "tokens": 0, "logprob": 0.0, "finished": 0,
             **{f"grams_{n}": 0 for n in NGRAMS}}
    sketches: dict[str, np.ndarray] = {}
    for part in partials:
        for key in total:
            total[key] += part[key]
        for key in [f"sketch_{n}" for n in NGRAMS] + ["sketch_stories"]:
            merged = np.concatenate([sketches.get(key, np.zeros(0, np.uint64)),
                                     np.asarray(part[key], dtype=np.uint64)])
            sketches[key] = _smallest(merged)
    stats = {f"distinct_{n}": (_distinct(sketches[f"sketch_{n}"]) / total[f"grams_{n}"]
                               if total[f"grams_{n}"] else 0.0) for n in NGRAMS}
    stats["unique_stories"] = _distinct(sketches["sketch_stories"]) / max(1, total["rows"])
    stats["mean_length"] = total["tokens"] / max(1, total["rows"])
    # The sampling distribution's entropy rate, estimated by the samples' own
    # log-probabilities (0 for greedy decoding); each story's EOT counts when it ended.
    stats["sample_entropy"] = -total["logprob"] / max(1, total["tokens"] + total["finished"])
    return stats


def _distinct(sketch: np.ndarray) -> float:
    if len(sketch) < SKETCH:
        return float(len(sketch))  # every distinct hash is kept: exact
    return (SKETCH - 1) / ((float(sketch[-1]) + 1) / 2.0**64)


def sample_stats(table: pa.Table) -> dict[str, float]:
    """The statistics of a sampled corpus in memory (one batch)."""
    return merge_stats([partial_stats(table)])


# ------------------------------------------------------------ corpus statistics
#
# Every statistic of a sampled corpus is a `CorpusStatistic`: a partial per batch,
# computed where the batch is (a Ray Data task, or this process), and a merge of the
# partials into numbers. A new corpus metric is one class and one line in `statistics`.

class CorpusStatistic(Protocol):
    name: str  # the key its partial travels under

    def partial(self, batch: pa.Table) -> dict: ...

    def merge(self, partials: list[dict]) -> dict[str, float]: ...


class Diversity:
    """distinct n-grams and stories (sketched), mean length, the sampling entropy rate."""

    name = "diversity"

    def partial(self, batch: pa.Table) -> dict:
        part = partial_stats(batch)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in part.items()}

    def merge(self, partials: list[dict]) -> dict[str, float]:
        return merge_stats([{k: (np.asarray(v, dtype=np.uint64) if k.startswith("sketch_")
                                 else v) for k, v in p.items()} for p in partials])


class Tails:
    """Zipf slope, rare-token mass against the real data's rare tokens, repetition,
    self-BLEU (engine/families/lm/tails.py)."""

    name = "tails"

    def __init__(self, real_rare: np.ndarray | None):
        self.real_rare = real_rare

    def partial(self, batch: pa.Table) -> dict:
        from engine.families.lm import tails

        return tails.partial(batch)

    def merge(self, partials: list[dict]) -> dict[str, float]:
        from engine.families.lm import tails

        return tails.merge(partials, self.real_rare)


class Grammaticality:
    """For corpora sampled from models of the grammar's stories: each story checked
    against the grammar (see `grammar_stats`)."""

    name = "grammar"

    def __init__(self, model_dir: str, sampled_grammatical: float | None = None):
        self.model_dir = model_dir
        # q(G) as curation measured it over every story it looked at: a curated corpus
        # is not the model's own draws (an `ungrammatical` filter leaves only G in it)
        self.sampled_grammatical = sampled_grammatical

    def partial(self, batch: pa.Table) -> dict:
        return {k: v[0] for k, v in _grammar_partial(batch, self.model_dir).items()}

    def merge(self, partials: list[dict]) -> dict[str, float]:
        rows = sum(p["rows"] for p in partials)
        grammatical = sum(p["grammatical"] for p in partials)
        excess = sum(p["excess"] for p in partials)
        share = grammatical / max(1, rows)
        excess = excess / grammatical if grammatical else float("nan")
        # Without curation the corpus is the model's own draws: q(G) is what it shows.
        q = share if self.sampled_grammatical is None else self.sampled_grammatical
        return {"grammatical": share, "sampled_grammatical": q,
                "grammar_reverse_kl": reverse_kl_on_grammar(excess, q)}


def reverse_kl_on_grammar(mean_excess: float, q_grammatical: float) -> float:
    """KL(q_G ‖ p): the sampling distribution q conditioned on the grammar's support G
    (q_G(x) = q(x) / q(G) on G) against the grammar p. `mean_excess` is the mean of
    log q(x) − log p(x) over draws of q that fall in G (draws of q_G), so

        KL(q_G ‖ p) = E_{q_G}[log q(x) − log q(G) − log p(x)] = mean_excess − log q(G).

    A KL, so >= 0 (up to sampling noise), and 0 exactly when q puts its grammatical mass
    the grammar's way, however much mass it puts off the grammar (that is q(G), reported
    beside it). The plain mean_excess is not a KL: it is log q(G) < 0 for q = q(G)·p."""
    if not q_grammatical or math.isnan(mean_excess):
        return float("nan")
    return mean_excess - math.log(q_grammatical)


def statistics(grammar_model: str | None = None,
               real_rare: np.ndarray | None = None,
               sampled_grammatical: float | None = None) -> list[CorpusStatistic]:
    """The statistics a sampled corpus gets: diversity and tails always; with
    `grammar_model` (the sampling model's directory, for its tokenizer), the grammar
    check (`sampled_grammatical`: q(G) as curation measured it, for a curated corpus)."""
    return [Diversity(), Tails(real_rare)] + \
        ([Grammaticality(grammar_model, sampled_grammatical)]
         if grammar_model is not None else [])


def corpus_stats(dataset, grammar_model: str | None = None,
                 real_rare: np.ndarray | None = None,
                 sampled_grammatical: float | None = None) -> dict[str, float]:
    """The statistics of a sampled corpus on storage (a Ray Dataset of its shards, with
    their `_row`s, or its files' tables read in this process): every statistic's
    partial per batch where the data is, merged here as they arrive (one small JSON
    string per batch and statistic: no process holds the corpus)."""
    from engine import raydata

    measured = statistics(grammar_model, real_rare, sampled_grammatical)
    columns = [ROW, "ids", "n_tokens", "logprob", "finished"]
    if not hasattr(dataset, "map_batches"):  # tables in this process (sampler_actors: 0)
        rows = [{k: v[0] for k, v in _partial_row(t.select(columns), measured).items()}
                for t in dataset]
    else:
        rows = list(dataset.select_columns(columns, num_cpus=raydata.CHAIN_TASK_CPUS)
                    .map_batches(_partial_row, fn_kwargs={"measured": measured},
                                 batch_format="pyarrow", batch_size=8192,
                                 num_cpus=raydata.CHAIN_TASK_CPUS).iter_rows())
    stats: dict[str, float] = {}
    for statistic in measured:
        stats.update(statistic.merge([json.loads(r[statistic.name]) for r in rows]))
    return stats


def _partial_row(batch: pa.Table, measured: list[CorpusStatistic]) -> dict:
    # each partial as one JSON string: lists whose lengths vary by batch (and may be
    # empty) would give each batch's one-row block its own Arrow type
    return {s.name: [json.dumps(s.partial(batch))] for s in measured}


# ------------------------------------------------------------ against the grammar
_TOKENIZERS: dict = {}  # per worker process: a decoder loaded once, not per batch


def _grammar_partial(batch: pa.Table, model_dir: str) -> dict:
    """One batch of a sampled corpus: each story decoded with the sampling model's
    tokenizer and parsed by the grammar (engine/families/lm/grammar.py); how many the
    grammar can produce and, for those, the model's log-probability minus the grammar's.
    A task, not an actor: a pool's start-up would cost every corpus seconds."""
    from engine.families.lm.grammar import log_probability

    if model_dir not in _TOKENIZERS:
        # The `tokenizers` library alone (what transformers' fast tokenizer decodes
        # with, the same text): importing transformers costs a fresh worker seconds.
        from tokenizers import Tokenizer

        from engine.files import Location

        _TOKENIZERS[model_dir] = Tokenizer.from_str(
            (Location.of(model_dir) / "tokenizer.json").read_text())
    tokenizer = _TOKENIZERS[model_dir]
    rows = grammatical = 0
    excess = 0.0
    for ids, logprob, finished in zip(batch.column("ids").to_pylist(),
                                      batch.column("logprob").to_pylist(),
                                      batch.column("finished").to_pylist()):
        rows += 1
        truth = log_probability(tokenizer.decode(ids, skip_special_tokens=True))
        # A story cut at the length limit is not one the grammar ends: not counted.
        if truth is not None and finished:
            grammatical += 1
            excess += logprob - truth
    return {"rows": [rows], "grammatical": [grammatical], "excess": [excess]}


def grammar_stats(dataset, model_dir: str) -> dict[str, float]:
    """For corpora sampled from models of the grammar's stories: `grammatical`, the
    fraction of the corpus's stories the grammar can produce (an exact verifier);
    `sampled_grammatical`, q(G), the fraction of the model's own draws it can produce
    (the same without curation); and `grammar_reverse_kl`, KL(q_G ‖ p) of the sampling
    distribution q conditioned on the grammar against the grammar p
    (`reverse_kl_on_grammar`). The unconditioned reverse KL is infinite whenever q puts
    mass off the grammar (p = 0 there): q(G) says how much. Chains get them from
    corpus_stats' one pass."""
    stats = corpus_stats(dataset, grammar_model=model_dir)
    return {k: stats[k] for k in ("grammatical", "sampled_grammatical", "grammar_reverse_kl")}
