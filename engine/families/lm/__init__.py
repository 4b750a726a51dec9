"""Language models trained generation after generation on their predecessors' stories.

The seed paper's main experiment (Gerstgrasser et al. 2024, §2): a freshly initialised
causal LM is pretrained on real stories; each later generation samples a corpus from
the previous model and trains a new model from scratch on the strategy's mix.

Rows of every corpus: `text`, `ids` (tokens, no EOT), `n_tokens`, plus `true_logprob`
(grammar corpus) or `logprob`/`finished` (sampled corpora). Tokens, not text, are what
training reads: each generation is tokenized once, when it is written.

Where each phase runs: the fit on Ray Train workers (engine.fit, `trainer: ray`) or in
the chain's process (`trainer: local`); evaluation where the study's GPUs are (a Ray
task holding one, when the chain's own process has none); sampling in a Ray Data pool
of vLLM engines or transformers decoders (`sampler`), on `sampler_gpus` each.

This module imports no torch at the top: reading a study file stays light.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

# (the field-role helper `sampling` under another name: bound here as `sampling` it
# would hide this package's `sampling` subpackage as an attribute)
from engine.families.base import (Bundle, Family, ParamError, Presentation, Processes, fit,
                                   later_fits, resources)
from engine.families.base import sampling as sampling_field
from engine.families.lm import grammar
from engine.corpus import StoredRows
from engine.families.lm.data import GRAMMAR, DataError, read_stories
from engine.families.lm.tokenizer import SPECIAL_TOKENS, minimum_vocab_size
from engine.families.lm.zoo import ZOO
from engine.files import Location, is_remote
from engine.seeds import derive_seed

log = logging.getLogger("engine.lm")

CHARS_PER_TOKEN = 4.0  # byte-level BPE on English stories, vocabularies of ~1k-32k
TINYSTORIES_TOKENS_PER_STORY = 224  # 470M tokens / 2.1M stories (the seed paper)


# ------------------------------------------------------------------------ real data

@dataclass
class LMReal:
    directory: "Location"  # the study's prepared real data (engine/families/lm/prepare.py)
    tokenizer_dir: str  # a local copy of its tokenizer
    test: pa.Table  # the held-out REAL test stories (small: `test_stories` of them)
    train_chunks: list[StoredRows]  # row ranges of the prepared training split
    vocab_size: int
    eos: int
    pad: int


@dataclass
class LMModel:
    path: str  # an HF checkpoint directory here (weights, config, tokenizer, train_curve.json)
    # The same checkpoint where every node reaches it: a path on shared storage, or an
    # object-store URI (sampler actors and evaluation tasks on other nodes load it there).
    source: str
    curve: list[tuple[int, float]]


def _token_count(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: a batch's token and row counts, as one row."""
    import pyarrow.compute as pc

    tokens = pc.sum(batch.column("n_tokens")).as_py() or 0
    return pa.table({"tokens": [int(tokens)], "rows": [batch.num_rows]})


def story_texts(table: pa.Table, model_dir) -> list[str]:
    """Stories as text: real rows carry theirs; sampled rows only token ids, decoded
    with the sampling model's tokenizer (saved in its checkpoint)."""
    if "text" in table.column_names:
        return [str(t) for t in table.column("text").to_pylist()]
    from engine.families.lm.tokenizer import load_tokenizer
    from engine.files import local_copy

    tokenizer = load_tokenizer(local_copy(model_dir))
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in table.column("ids").to_pylist()]


class LanguageModel(Family):
    name = "lm"
    weighted_fit = True  # a weighted mix's token weights (train.packed_batches)
    weight_unit = "n_tokens"  # the loss is a mean over tokens: a kind's share is its tokens'
    metrics = ("test_loss", "kl_to_truth", "truth_loss", "distinct_1", "distinct_2",
               "distinct_3", "unique_stories", "mean_length", "sample_entropy",
               "zipf_slope", "rare_token_mass", "rep_4", "self_bleu",
               "grammatical", "sampled_grammatical", "grammar_reverse_kl")  # headline first; the last three: grammar data
    presentation = Presentation(
        paper_table=True,
        reference_lines={"test_loss": "truth_loss"},  # the grammar's own entropy rate
        sample_text=lambda table, model_dir: story_texts(table, model_dir))
    path_fields = ("data", "tokenizer")
    path_keywords = (GRAMMAR,)

    @dataclass(frozen=True)
    class Config:
        data: str = fit(GRAMMAR)  # "grammar", or a TinyStories .txt / Parquet / JSON(L) path or URI
        stories: int = fit(2000)  # grammar: how many stories to draw (train + test)
        max_stories: int | None = fit(None)  # files: read only the first N stories
        test_stories: int = fit(200)  # held-out REAL test stories, fixed per study seed
        train_stories: int | None = fit(None)  # T per generation (default: all not held out)
        tokenizer: str | None = fit(None)  # a tokenizer directory; default: train byte-level BPE
        vocab_size: int = fit(512)  # the byte-level BPE's vocabulary
        model: str = fit("small")  # a zoo size (engine/families/lm/zoo.py), or a pretrained checkpoint: a Hugging Face id, a directory, s3:// or gs:// (its tokenizer comes with it)
        start: Literal["scratch", "warm"] = later_fits("scratch")  # scratch: the model's initial weights every generation (fresh for a zoo size, the checkpoint's for a pretrained model); warm: the previous generation's (Bertrand et al. 2024)
        context: int = fit(256)  # tokens per training block, and the longest story sampled
        temperature: float = sampling_field(1.0)  # sampling temperature (0: greedy)
        top_k: int = sampling_field(0)  # 0: off (pure ancestral sampling, as the paper)
        top_p: float = sampling_field(1.0)  # 1.0: off
        repetition_penalty: float = sampling_field(1.0)  # > 1: tokens already in a story less likely (Shumailov et al.: 3); 1.0: off
        beams: int = sampling_field(1)  # > 1: beam search with this many beams instead of sampling (Shumailov et al.: 5); deterministic, so temperature, top_k and top_p stay at their defaults
        prompt: Literal["bos", "real_prefix"] = sampling_field("bos")  # what each sampled story starts from
        prefix_tokens: int = sampling_field(8)  # real_prefix: tokens of a real training story to start from
        max_new_tokens: int = sampling_field(256)  # the longest sampled story, in tokens
        epochs: float = fit(1.0)  # passes over the mix per generation
        token_budget: int | None = fit(None)  # train on this many tokens instead of `epochs`
        batch_size: int = fit(16)  # blocks per step per worker
        lr: float = fit(2e-3)  # peak learning rate (AdamW, linear warmup then cosine decay)
        warmup: float = fit(0.05)  # fraction of steps
        weight_decay: float = fit(0.1)  # AdamW's decoupled weight decay
        precision: Literal["auto", "fp32", "bf16"] = fit("auto")  # auto: bf16 on GPUs that have it, else fp32
        zero_stage: int = fit(0)  # DeepSpeed ZeRO stage 0-3 (3: weights gathered before saving)
        trainer: Literal["ray", "local"] = fit("ray")  # ray: Ray Train workers; local: in-process
        workers: int = fit(1)  # trainer workers (the most, when elastic)
        min_workers: int | None = resources(None)  # elastic: the fewest a fit may go on with after a failure
        cpus_per_worker: float = resources(0.5)  # < 1 on small machines, or Ray Data starves
        gpus_per_worker: float = fit(0.0)  # GPUs per trainer worker; > 0 evaluates on a GPU too
        worker_resources: dict | None = resources(None)  # more Ray resources per worker, e.g. {"trainer": 1}
        max_failures: int = resources(3)  # worker-group restarts a fit may take (-1: unlimited)
        checkpoint_minutes: float = resources(10.0)  # training time between checkpoints (0: none)
        threads: int = resources(0)  # torch threads per trainer worker / sampler actor / CPU evaluation; 0: torch default
        sampler: Literal["auto", "vllm", "hf"] = sampling_field("auto")  # auto: vllm when installed, else hf
        sampler_actors: int = resources(1)  # sampler processes (vLLM engines or transformers decoders); 0: transformers decoding in the chain's own process (no process start-up per generation: minutes-long CPU studies)
        sampler_cpus: float = resources(0.5)  # CPUs per sampler actor
        sampler_gpus: float = resources(0.0)  # GPUs per sampler actor
        sample_batch_size: int = sampling_field(64)  # stories per sampling batch
        curate: list | None = sampling_field(None)  # filters between sampling and storing, in order: unfinished, duplicates, near_duplicates, perplexity, ungrammatical (grammar data); the corpus is topped up to its size
        perplexity_band: list | None = sampling_field(None)  # [low, high]: the `perplexity` filter keeps stories whose perplexity under the sampling model lies inside
        score_under_first: bool = sampling_field(False)  # score each generation's samples under generation 1's model: perplexity histograms and the tail beyond real data's (Shumailov et al. 2024; engine/families/lm/first_model.py)
        log_every: int = fit(10)  # a train-loss point every this many steps
        loss: dict | None = later_fits(None)  # the loss from generation 2 on (generation 1, real data alone, stays shared): null, cross-entropy; {name: truncated_ce, threshold: γ}: tokens the model already predicts with probability above γ add no loss (Shabgahi et al. 2025, ForTIFAI)

    def validate(self) -> None:
        self._validate_numbers()
        self._validate_model_and_data()
        self._validate_sampling()
        self._validate_placement()

    def _validate_numbers(self) -> None:
        p = self.config
        if p.temperature < 0:
            raise ParamError("temperature", f"must be >= 0, got {p.temperature}")
        for name, low in (("stories", 2), ("test_stories", 1), ("context", 8),
                          ("max_new_tokens", 1), ("batch_size", 1), ("workers", 1),
                          ("sampler_actors", 0), ("sample_batch_size", 1), ("log_every", 1),
                          ("prefix_tokens", 1)):
            if getattr(p, name) < low:
                raise ParamError(name, f"must be >= {low}, got {getattr(p, name)}")
        for name in ("max_stories", "train_stories", "token_budget"):
            if getattr(p, name) is not None and getattr(p, name) < 1:
                raise ParamError(name, f"must be >= 1 or null, got {getattr(p, name)}")
        if p.epochs <= 0 or p.lr <= 0:
            raise ParamError("epochs" if p.epochs <= 0 else "lr", "must be > 0")
        if not 0 <= p.warmup < 1:
            raise ParamError("warmup", f"must be in [0, 1), got {p.warmup}")
        if not 0 < p.top_p <= 1:
            raise ParamError("top_p", f"must be in (0, 1], got {p.top_p}")
        if p.repetition_penalty <= 0:
            raise ParamError("repetition_penalty", f"must be > 0 (1.0: off), got "
                                                   f"{p.repetition_penalty}")
        if p.zero_stage not in (0, 1, 2, 3):
            raise ParamError("zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
        if p.beams < 1:
            raise ParamError("beams", f"must be >= 1 (1: sampling), got {p.beams}")
        from engine.families.lm import train

        train.loss_for(p.loss)  # ParamError naming `loss` if it is not one the fit knows

    def _validate_model_and_data(self) -> None:
        from engine.families.lm import pretrained

        p = self.config
        wrong = pretrained.problem(p.model)
        if wrong:
            raise ParamError("model", wrong)
        if not pretrained.is_pretrained(p.model) and p.vocab_size < minimum_vocab_size():
            raise ParamError("vocab_size", f"must be >= {minimum_vocab_size()} (256 byte tokens + "
                                           f"{len(SPECIAL_TOKENS)} special tokens), got {p.vocab_size}")
        if p.data == GRAMMAR:
            if p.test_stories >= p.stories:
                raise ParamError("test_stories", f"must be below stories = {p.stories}, "
                                                 f"got {p.test_stories}")
        elif not is_remote(p.data):
            # Local data is checked now, before anything runs; URIs are read when the study starts.
            try:
                read_stories(p.data, max_stories=1)
            except DataError as e:
                raise ParamError("data", str(e)) from None
        if p.tokenizer is not None and not is_remote(p.tokenizer) and \
                not (Path(p.tokenizer) / "tokenizer.json").exists():
            raise ParamError("tokenizer", f"{p.tokenizer}: no tokenizer.json in this directory")

    def _validate_sampling(self) -> None:
        """Curation, beam search and where sampling runs."""
        from engine.families.lm import curation

        p = self.config
        for f in p.curate or []:
            if f not in curation.FILTERS:
                raise ParamError("curate", f"unknown filter {f!r} (known: "
                                           f"{', '.join(curation.FILTERS)})")
        if p.curate and len(set(p.curate)) != len(p.curate):
            raise ParamError("curate", f"a filter listed twice in {p.curate!r}")
        if "perplexity" in (p.curate or []):
            band = p.perplexity_band
            if not (isinstance(band, list) and len(band) == 2
                    and all(isinstance(x, (int, float)) for x in band) and 0 <= band[0] < band[1]):
                raise ParamError("perplexity_band", "the perplexity filter needs [low, high] "
                                                    f"with 0 <= low < high, got {band!r}")
        if "ungrammatical" in (p.curate or []) and p.data != GRAMMAR:
            raise ParamError("curate", "the `ungrammatical` filter needs data: grammar (the "
                                       "grammar is the only source with an exact verifier)")
        if p.beams > 1:
            for name, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0)):
                if getattr(p, name) != off:
                    raise ParamError(name, f"beam search (beams: {p.beams}) is deterministic "
                                           f"and reads no {name}; leave it at {off}")
            if p.repetition_penalty != 1.0 and p.sampler == "vllm":
                raise ParamError("sampler", "vLLM's beam search has no repetition penalty; "
                                            "use sampler: hf (or auto) with beams > 1 and a "
                                            "repetition_penalty")
            if p.prompt == "bos":
                warnings.warn("beam search with BOS prompts makes every sampled story the same "
                              "story; use prompt: real_prefix (Shumailov et al.: 64 tokens)")
        if p.temperature == 0 and p.prompt == "bos":
            warnings.warn("temperature 0 with BOS prompts makes every sampled story the same "
                          "greedy story; use prompt: real_prefix for a meaningful greedy corpus")
        if p.sampler_actors == 0:
            here = "sampler_actors: 0 decodes in the chain's own process"
            if p.sampler == "vllm" or p.beams > 1:
                raise ParamError("sampler" if p.sampler == "vllm" else "beams",
                                 f"{here}, with the transformers sampler only; set "
                                 "sampler_actors >= 1 for vLLM or beam search")
            if p.curate:
                raise ParamError("curate", f"{here}; curation's rounds run in sampler "
                                           "actors: set sampler_actors >= 1")
            if p.sampler_gpus:
                raise ParamError("sampler_gpus", f"{here}, which holds no GPU of its own: "
                                                 "set sampler_actors >= 1")

    def _validate_placement(self) -> None:
        p = self.config
        if p.cpus_per_worker < 0 or p.gpus_per_worker < 0 or p.sampler_gpus < 0:
            raise ParamError(next(k for k in ("cpus_per_worker", "gpus_per_worker", "sampler_gpus")
                                  if getattr(p, k) < 0), "must be >= 0")
        if p.sampler_cpus <= 0:
            raise ParamError("sampler_cpus", "must be > 0")
        if p.min_workers is not None and not 1 <= p.min_workers <= p.workers:
            raise ParamError("min_workers", f"must be between 1 and workers = {p.workers}, "
                                            f"got {p.min_workers}")
        if p.max_failures < -1 or p.checkpoint_minutes < 0:
            raise ParamError("max_failures" if p.max_failures < -1 else "checkpoint_minutes",
                             "must be >= -1" if p.max_failures < -1 else "must be >= 0")
        if p.worker_resources is not None and not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                for k, v in p.worker_resources.items()):
            raise ParamError("worker_resources", "expected a mapping of Ray resource names to "
                                                 f"amounts >= 0, got {p.worker_resources!r}")

    # ------------------------------------------------------------------ real data
    def _real_directory(self, seed: int, cache_dir: "Location") -> "Location":
        """One prepared directory per distinct real data: every grid point that reads
        the same stories, split and tokenizer shares it."""
        p = self.config
        shaping = (seed, p.data, p.stories, p.max_stories, p.test_stories, p.tokenizer,
                   p.vocab_size)
        if p.model not in ZOO:  # a pretrained model's tokenizer shapes the tokens
            shaping += (p.model,)
        return Location.of(cache_dir) / f"lm-{derive_seed(*shaping):016x}"

    def prepare(self, seed: int, cache_dir: "Location") -> str | None:
        from engine.families.lm.prepare import prepare, read_prepared

        directory = self._real_directory(seed, cache_dir)
        if read_prepared(directory) is not None:
            return None
        try:
            p = prepare(self.config, seed, directory)
        except Exception as e:
            # Bad data found by a Ray task (a record whose text is not text): the one
            # line it raised, not Ray's wrapper, and nothing left behind. (A preparation
            # killed midway keeps its finished steps; this one would only fail again.)
            from engine.errors import collapse_error_in

            told = collapse_error_in(e)
            if told is None:
                raise
            directory.remove()
            raise told from None
        return (f"real data: {p.stories} stories prepared ({p.train} train, {p.test} test), "
                f"vocabulary {p.vocab}, in {directory}")

    def real_data(self, seed: int, chunks: int, cache_dir: "Location") -> LMReal:
        from engine.families.lm.prepare import TEST, TRAIN, prepare
        from engine.families.lm.tokenizer import load_tokenizer
        from engine.files import local_copy

        p = self.config
        # `collapse run` prepares before any chain starts; a chain run on its own
        # (tests, benchmarks) prepares here
        prepared = prepare(p, seed, self._real_directory(seed, cache_dir))
        tokenizer_dir = local_copy(prepared.tokenizer)
        tokenizer = load_tokenizer(tokenizer_dir)
        # T is stated (train_stories) or all the training split; never shrunk to make
        # room for the fresh real chunks a strategy reads (that would change T for it alone).
        T = p.train_stories or prepared.train
        if chunks * T > prepared.train:
            raise DataError(f"family.train_stories: {chunks} real chunk(s) of T = {T} stories "
                            f"need {chunks * T} training stories; the data has "
                            f"{prepared.train}: set train_stories to at most "
                            f"{prepared.train // chunks} (a strategy that reads fresh real "
                            "data needs a chunk per generation)")
        store = prepared.store.root.uri
        return LMReal(directory=prepared.directory, tokenizer_dir=str(tokenizer_dir),
                      test=prepared.store.table(TEST),
                      train_chunks=[StoredRows(store, TRAIN, k * T, T) for k in range(chunks)],
                      vocab_size=len(tokenizer), eos=tokenizer.eos_token_id,
                      pad=tokenizer.pad_token_id)

    # -------------------------------------------------------------- model and loops
    def data_view(self) -> str:
        return "dataset" if self.config.trainer == "ray" else "stream"

    def _workers(self):
        from engine.fit import Workers

        p = self.config
        return Workers(max_workers=p.workers, min_workers=p.min_workers,
                       cpus_per_worker=p.cpus_per_worker, gpus_per_worker=p.gpus_per_worker,
                       extra_resources=dict(p.worker_resources or {}),
                       max_failures=p.max_failures,
                       checkpoint_seconds=60 * p.checkpoint_minutes)

    def fit(self, real: LMReal, mix, seed: int, context) -> LMModel:
        """Train a fresh model (or, with start: warm, the previous generation's) on the
        mix: in this process on an in-memory table
        (trainer: local), or on Ray Train workers streaming packed blocks from a Ray
        Dataset of the mix (trainer: ray), whose checkpoints live in
        `context.workdir`/ray_train so that a rerun goes on from the latest. The model
        lands in a local directory, which the chain saves into the run."""
        from engine.families.lm import train
        from engine.families.lm.tokenizer import load_tokenizer
        from engine.fit import FitJob, LoopConfig, fit_here, fit_on_workers

        p = self.config
        seed = seed % 2**31
        previous = getattr(context, "previous_model", None)
        if p.start == "warm" and previous is not None:
            build = train.CheckpointBuilder(previous.uri)
            log.info("fit: warm start from %s", previous)
        elif p.model not in ZOO:
            build = train.CheckpointBuilder(p.model)
            log.info("fit: fine-tuning the pretrained %s", p.model)
        else:
            build = train.ModelBuilder(p.model, real.vocab_size, p.context, real.eos,
                                       real.eos, real.pad)
        out = Path(tempfile.mkdtemp(prefix="collapse-lm-"))
        settings = train.fit_settings(p)
        # `loss` is read by the fits after generation 1 only (its role, later_fits)
        loss = train.loss_for(p.loss if previous is not None else None)
        if p.trainer == "local":
            tokens, stories_in_mix = self._mix_size(mix, context)
            steps = train.total_steps(tokens, stories_in_mix, p.context, p.batch_size,
                                      p.epochs, 1, p.token_budget)
            job = FitJob(build, train.StreamBlocks(mix, p.context, real.eos, p.batch_size, seed),
                         loss, train.save_model,
                         LoopConfig(steps=steps, seed=seed, **settings))
            record = fit_here(job, out, context.progress)
        else:
            from engine.raydata import CHAIN_TASK_CPUS

            tokens, stories_in_mix = self._mix_size(mix, context)
            # Steps are fixed from the most workers; a group restarted with fewer after a
            # failure takes the remaining steps with a smaller global batch.
            steps = train.total_steps(int(tokens), int(stories_in_mix),
                                      p.context, p.batch_size, p.epochs, p.workers,
                                      p.token_budget)
            # No global shuffle: the chain streams the mix's files in a seeded order
            # (CorpusStore.dataset), then each worker's shuffle window
            # (engine/families/lm/train.py).
            from engine.corpus import WEIGHT

            stories = mix.select_columns(["ids"] + ([WEIGHT] if context.weighted else []),
                                         num_cpus=CHAIN_TASK_CPUS)
            job = FitJob(build, train.ShardBlocks(p.context, real.eos, p.batch_size, seed),
                         loss, train.save_model,
                         LoopConfig(steps=steps, seed=seed, **settings))
            record = fit_on_workers(job, self._workers(), context.workdir / "ray_train", out,
                                    context.callbacks, datasets={"train": stories},
                                    progress=context.progress)
            if record["resumed_at_step"] is not None:
                log.warning("training resumed from its checkpoint at step %d and finished "
                            "with %d worker(s)", record["resumed_at_step"], record["world_size"])
        load_tokenizer(real.tokenizer_dir).save_pretrained(out)
        return LMModel(path=str(out), source=str(out), curve=train.read_curve(out))

    @staticmethod
    def _mix_size(mix, context) -> tuple[int, int]:
        """(tokens, stories) of the mix: from the store's manifest where the chain gives
        it, else one pass over the mix's `n_tokens` (a stream file by file; a Dataset
        where the data is: not Dataset.aggregate, whose shuffle tasks ask for a whole
        CPU, which a busy small machine lacks)."""
        from engine.raydata import CHAIN_TASK_CPUS

        if getattr(context, "mix_size", None) is not None:
            return context.mix_size("n_tokens")
        if hasattr(mix, "tables"):  # a MixStream
            tokens = stories = 0
            for table in mix.tables(["n_tokens"], 0):
                tokens += int(pa.compute.sum(table.column("n_tokens")).as_py() or 0)
                stories += table.num_rows
            return tokens, stories
        sums = mix.select_columns(["n_tokens"], num_cpus=CHAIN_TASK_CPUS).map_batches(
            _token_count, batch_format="pyarrow", num_cpus=CHAIN_TASK_CPUS)
        tokens = stories = 0
        for row in sums.iter_rows():
            tokens, stories = tokens + row["tokens"], stories + row["rows"]
        return tokens, stories

    def evaluation_gpus(self) -> float:
        """Evaluation runs where the study's GPUs are: the trainer workers' or, failing
        those, the sampler actors' (one at most)."""
        p = self.config
        trainer = p.gpus_per_worker if p.trainer == "ray" else 0.0
        return min(1.0, trainer or p.sampler_gpus)

    def evaluate(self, real: LMReal, model: LMModel) -> dict[str, float]:
        from engine.families.lm.metrics import evaluate_checkpoint
        from engine.fit import run_on_gpu

        p = self.config
        return run_on_gpu(self.evaluation_gpus(), p.cpus_per_worker, evaluate_checkpoint,
                          model.source, real.test, real.eos, real.pad, p.context, p.threads)

    def compare(self, real: LMReal, first_model, model: LMModel,
                corpus) -> tuple[dict[str, float], dict[str, dict]]:
        from engine.families.lm import first_model as scoring
        from engine.fit import run_on_gpu

        p = self.config
        if not p.score_under_first:
            return {}, {}
        return run_on_gpu(self.evaluation_gpus(), p.cpus_per_worker, scoring.against_first,
                          first_model().source, real.test, corpus, real.eos, real.pad,
                          p.context, p.threads)

    @staticmethod
    def _prefixes(chunk: StoredRows, length: int) -> list[list[int]]:
        """The first `length` tokens of each story of the chunk that has that many, in
        row order, read file by file (only the prefixes are kept)."""
        import pyarrow.compute as pc

        from engine.corpus import CorpusStore

        found: list[tuple[int, list[int]]] = []
        for part in CorpusStore(chunk.store).scan(chunk.source, ["ids"]):
            rows = part.column("_row").to_numpy() - chunk.offset
            ids = part.column("ids")
            keep = (rows >= 0) & (rows < chunk.rows) & \
                (pc.list_value_length(ids).to_numpy(zero_copy_only=False) >= length)
            prefixes = pc.list_slice(ids.filter(pa.array(keep)), 0, length).to_pylist()
            found.extend(zip(rows[keep].tolist(), prefixes))
        return [ids for _, ids in sorted(found)]

    def _settings(self, real: LMReal):
        from engine.families.lm.sampling import SampleSettings

        p = self.config
        prefix = p.prefix_tokens if p.prompt == "real_prefix" else 0
        return SampleSettings(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              repetition_penalty=p.repetition_penalty, beams=p.beams,
                              max_new_tokens=min(p.max_new_tokens, p.context - 1 - prefix),
                              eos=real.eos, batch_size=p.sample_batch_size,
                              threads=p.threads)

    def _requests(self, real: LMReal, n: int, seed: int, start: int = 0):
        """Which stories to sample: start..start+n-1, each with its seed and prompt."""
        from engine.families.lm.sampling import Requests

        p = self.config
        if p.prompt == "bos":
            return Requests(n, seed, real.eos, start=start)
        import numpy as np

        prefixes = self._prefixes(real.train_chunks[0], p.prefix_tokens)
        if not prefixes:
            raise DataError(f"family.prefix_tokens: no training story has "
                            f"{p.prefix_tokens} tokens")
        order = np.random.default_rng(derive_seed(seed, "prompts")).permutation(len(prefixes))
        return Requests(n, seed, real.eos, np.asarray(prefixes, dtype=np.int32), order, start)

    def _sampled_here(self, real: LMReal, model: LMModel, n: int, seed: int,
                      progress: "Location | None" = None):
        """The corpus as tables of up to ROWS_PER_FILE stories, decoded in this process
        (sampler_actors: 0), in row order."""
        from engine.families.lm.sampling import here
        from engine.raydata import ROWS_PER_FILE

        return here.sampled_here(model.source, self._requests(real, n, seed),
                                 self._settings(real), ROWS_PER_FILE,
                                 progress.uri if progress else None)

    def _sampled(self, real: LMReal, model: LMModel, n: int, seed: int,
                 progress: "Location | None" = None, start: int = 0):
        """(the corpus as a lazy Ray Dataset, the backend): stories start..start+n-1."""
        from engine.families.lm.sampling import request_rows, sampled

        p = self.config
        prefix = p.prefix_tokens if p.prompt == "real_prefix" else 0
        settings = self._settings(real)
        requests = self._requests(real, n, seed, start)
        return sampled(p.sampler, model.source, request_rows(requests), 1 + prefix, settings,
                       p.sampler_actors, p.sampler_cpus, p.sampler_gpus,
                       progress.uri if progress else None)

    def sample(self, real: LMReal, model: LMModel, n: int, seed: int) -> pa.Table:
        """The corpus in memory, in row order (benchmarks, tests; chains use sample_to)."""
        from engine.families.lm.sampling import collect

        if self.config.sampler_actors == 0:
            return pa.concat_tables(self._sampled_here(real, model, n, seed)).drop_columns(
                ["_row"]).replace_schema_metadata({"sampler": "hf"})
        ds, backend = self._sampled(real, model, n, seed)
        return collect(ds).drop_columns(["_row"]).replace_schema_metadata({"sampler": backend})

    def sample_to(self, real: LMReal, model: LMModel, n: int, seed: int, directory,
                  progress=None) -> tuple[dict[str, float], dict[str, str]]:
        """The corpus written straight from the sampler actors into the store's
        `directory` (Ray Data's Parquet writer); its statistics computed batch by batch
        from the written shards and merged (engine/families/lm/metrics.py)."""
        from engine.families.lm.metrics import corpus_stats
        from engine.raydata import (CHAIN_TASK_CPUS, ROWS_PER_FILE, parquet_files_in,
                                    read_parquet_files, read_tables)

        fs, path = directory.arrow()
        light = {"num_cpus": CHAIN_TASK_CPUS}  # Ray Data's default of 1 CPU may never be free
        if self.config.curate:
            from engine.families.lm import curation

            backend, curated = curation.sample_curated(
                lambda count, start: self._sampled(real, model, count, seed, progress, start),
                self.config, n, directory)
        elif self.config.sampler_actors == 0:
            log.warning("sampler: %d stories with the hf backend in the chain's own process "
                        "(sampler_actors: 0)", n)
            backend, curated = "hf", {}
            import pyarrow.parquet as pq

            for k, table in enumerate(self._sampled_here(real, model, n, seed, progress)):
                pq.write_table(table, f"{path}/part-{k:05d}.parquet", filesystem=fs)
        else:
            ds, backend = self._sampled(real, model, n, seed, progress)
            log.warning("sampler: %d stories with the %s backend (%d actor%s)", n, backend,
                        self.config.sampler_actors,
                        "" if self.config.sampler_actors == 1 else "s")
            ds.write_parquet(path, filesystem=fs, num_rows_per_file=ROWS_PER_FILE,
                             ray_remote_args=light)
            curated = {}
        files = parquet_files_in(path, fs)
        columns = ["_row", "ids", "n_tokens", "logprob", "finished"]
        # In this process where the corpus was decoded here (no Ray Data task start-up
        # for a pass over a few files); else a Ray Data pass where the files are.
        written = (read_tables(files, fs, columns) if self.config.sampler_actors == 0
                   else read_parquet_files(files, fs, columns))
        # The grammar's stories: the truth is known, so every story is checked against it.
        stats = corpus_stats(written, model.source if self.config.data == GRAMMAR else None,
                             self._real_rare_tokens(real), curated.pop("sampled_grammatical", None))
        return {**stats, **curated}, {"sampler": backend}

    def _real_rare_tokens(self, real: LMReal):
        """The real training data's rare tokens (engine/families/lm/tails.py), counted
        once per prepared data by a Ray Data pass over its shards (this process holds
        only the counts) and kept beside it."""
        import json

        import numpy as np

        from engine.corpus import CorpusStore
        from engine.families.lm import tails
        from engine.files import write_json
        from engine.raydata import CHAIN_TASK_CPUS

        cached = Location.of(real.directory) / "rare_tokens.json"
        if cached.exists():  # (chains sharing the data may both count it: same result)
            return np.asarray(json.loads(cached.read_text()), dtype=np.int64)
        chunk = real.train_chunks[0]
        parts = CorpusStore(chunk.store).source_dataset(chunk.source, ["ids"]).map_batches(
            tails.token_partial_row, batch_format="pyarrow", batch_size=8192,
            num_cpus=CHAIN_TASK_CPUS)
        counts = tails.token_counts(json.loads(row["tail"]) for row in parts.iter_rows())
        rare = tails.rare_tokens(counts)
        write_json(cached, rare.tolist())
        return rare

    def save_model(self, model: LMModel, directory: Path) -> None:
        for f in Path(model.path).iterdir():
            shutil.move(str(f), directory / f.name)
        shutil.rmtree(model.path, ignore_errors=True)

    def load_model(self, directory) -> LMModel:
        from engine.families.lm.train import read_curve
        from engine.files import Location, local_copy

        directory = Location.of(directory)
        local = local_copy(directory)  # the run may live in an object store
        return LMModel(path=str(local), source=directory.uri, curve=read_curve(local))

    def curves(self, model: LMModel) -> dict[str, list[tuple[int, float]]]:
        return {"train_loss": model.curve}

    def cost(self):
        """Rows and tokens a generation will have, estimated without training a tokenizer."""
        from engine.families.lm.zoo import parameter_count
        from engine.plan import Cost

        p = self.config
        if p.data == GRAMMAR:
            n = p.stories
            chars = sum(len(s.text) for s in grammar.sample_stories(200, 0)) / 200
            tokens, how = chars / CHARS_PER_TOKEN, f"{CHARS_PER_TOKEN:g} characters per token"
        elif not is_remote(p.data):
            stories = read_stories(p.data, p.max_stories)
            n = len(stories)
            tokens = sum(map(len, stories)) / n / CHARS_PER_TOKEN
            how = f"{CHARS_PER_TOKEN:g} characters per token"
        else:
            if p.max_stories is None and p.train_stories is None:
                raise DataError(f"family.data: {p.data} is not read for a dry run; set "
                                "family.max_stories (or train_stories) to plan it")
            n = p.max_stories or (p.train_stories + p.test_stories)
            tokens, how = TINYSTORIES_TOKENS_PER_STORY, "TinyStories' 224 tokens per story"
        T = p.train_stories or n - p.test_stories
        if p.model in ZOO:
            N = parameter_count(ZOO[p.model], p.vocab_size, p.context)
        else:
            from engine.families.lm import pretrained

            N = pretrained.parameter_count(p.model)
        return Cost(rows_per_generation=T, tokens_per_row=tokens, parameters=N,
                    test_rows=p.test_stories, real_rows=n - p.test_stories,
                    rows_field="train_stories",
                    note=f"model {p.model}: {N / 1e6:.3g}M parameters " + (
                        f"at vocabulary {p.vocab_size}" if p.model in ZOO else
                        "(pretrained, with its own tokenizer)") +
                         f"; ~{tokens:.0f} tokens per story ({how}); "
                         f"T = {T} stories per generation")

    def model_name(self) -> str:
        return self.config.model

    def temperature(self) -> float:
        return self.config.temperature

    # ------------------------------------------------------------------ placement
    def chain_memory(self) -> int:
        """The driver holds the test split and a model for CPU evaluation (weights, a
        load copy, activations: ~16 bytes a parameter); with trainer: local, its shuffle
        window of the streamed mix and one file of it, with sampler_actors: 0, a file's
        worth of sampled stories (budget 512 MiB more); corpora stream past it."""
        from engine.families.lm.zoo import parameter_count

        p = self.config
        if p.model in ZOO:
            model = 16 * parameter_count(ZOO[p.model], p.vocab_size, p.context)
        else:
            from engine.families.lm import pretrained

            model = 16 * pretrained.parameter_count(p.model)
        here = p.trainer == "local" or p.sampler_actors == 0
        return (1 << 30) + model + ((512 << 20) if here else 0)

    def placement(self) -> list[Processes]:
        """Trainer workers (trainer: ray; elastic down to min_workers) while a
        generation fits, sampler actors while it samples."""
        p = self.config
        extra = p.worker_resources or {}
        worker = Bundle("trainer worker",
                        {"CPU": p.cpus_per_worker, "GPU": p.gpus_per_worker, **extra},
                        {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker",
                         **{k: "worker_resources" for k in extra}})
        sampler = Bundle("sampler actor", {"CPU": p.sampler_cpus, "GPU": p.sampler_gpus},
                         {"CPU": "sampler_cpus", "GPU": "sampler_gpus"})
        return ([Processes(worker, p.workers, "fit", p.min_workers)]
                if p.trainer == "ray" else []) + \
            ([Processes(sampler, p.sampler_actors, "sample")] if p.sampler_actors else [])
