"""What every sampling backend shares: the settings, the requests (which stories to
sample, each with its own seed and prompt), the rows a backend hands back, and the
`Sampler` interface each backend implements (one file each: hf.py, vllm.py,
vllm_beams.py)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW


@dataclass(frozen=True)
class SampleSettings:
    temperature: float
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    max_new_tokens: int
    eos: int
    batch_size: int
    threads: int = 0
    # > 1 makes every token already in the story (its prompt included) less likely: a
    # positive logit is divided by it, a negative one multiplied (Keskar et al. 2019, as
    # transformers and vLLM apply it, before the temperature)
    repetition_penalty: float = 1.0
    # > 1: beam search with this many beams (Shumailov et al.: 5) instead of sampling
    beams: int = 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sampler(ABC):
    """One decoding backend: turns a Ray Dataset of requests (`_row`, `prompt_ids`,
    `seed`) into a Ray Dataset of the corpus's rows (see `story_rows`), lazily, in
    `actors` processes of `cpus_per_actor` CPUs and `gpus_per_actor` GPUs each.
    `progress`: a directory where each actor writes how many rows it made
    (engine/progress.py). A new backend is a subclass in a file of its own, named in
    `engine.families.lm.sampling.BACKENDS`."""

    name = ""

    def __init__(self, model_dir: str, settings: SampleSettings, prompt_length: int,
                 actors: int, cpus_per_actor: float, gpus_per_actor: float,
                 progress: str | None = None):
        self.model_dir, self.settings, self.prompt_length = model_dir, settings, prompt_length
        self.actors, self.cpus_per_actor = actors, cpus_per_actor
        self.gpus_per_actor, self.progress = gpus_per_actor, progress

    @abstractmethod
    def rows(self, requests):
        """A Ray Dataset of the requests (`_row`, `prompt_ids`, `seed`) -> a Ray Dataset
        of the corpus's rows (`story_rows`), decoded by this backend's actors."""


def story_rows(row: np.ndarray, prompts, rows, tokenizer) -> pa.Table:
    """A backend's output rows: `_row` (the request's index), `text`, `ids` (the
    prompt's story tokens and the new ones, no EOT), `n_tokens`, `logprob` (the story's
    log-probability under the distribution it was drawn from), `finished` (ended with
    EOT rather than at the length limit)."""
    # The prompt's own story tokens (a real prefix) belong to the story; a lone EOT does not.
    eos = tokenizer.eos_token_id
    ids = [[t for t in p if t != eos] + r["ids"] for p, r in zip(prompts, rows)]
    return pa.table({
        ROW: pa.array(np.asarray(row, dtype=np.int64)),
        "text": pa.array(tokenizer.batch_decode(ids), pa.string()),
        "ids": pa.array(ids, pa.list_(pa.int32())),
        "n_tokens": pa.array([len(i) for i in ids], pa.int64()),
        "logprob": pa.array([r["logprob"] for r in rows], pa.float64()),
        "finished": pa.array([r["finished"] for r in rows], pa.bool_()),
    })


# ------------------------------------------------------------------------ requests

@dataclass(frozen=True)
class Requests:
    """What to sample: `n` stories, numbered start..start+n-1; story i from its own seed,
    derive_seed(seed, i), and its prompt: BOS alone, or BOS + prefixes[order[i %
    len(order)]] (real prefixes). A later `start` makes more stories of the same corpus
    (curation's top-ups)."""

    n: int
    seed: int
    bos: int
    prefixes: np.ndarray | None = field(default=None, compare=False)  # (m, L) token ids
    order: np.ndarray | None = field(default=None, compare=False)  # a permutation of m
    start: int = 0


REQUESTS_PER_SPAN = 4096


class _MakeRequests:
    """Ray Data batch function: request rows for a batch of story indices, built where
    they are used (a corpus of millions of stories is never listed in one process)."""

    def __init__(self, requests: Requests):
        self.r = requests

    def __call__(self, span: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from engine.seeds import derive_seed

        rows = np.arange(int(span["start"][0]), int(span["end"][0]), dtype=np.int64)
        seeds = np.array([derive_seed(self.r.seed, int(i)) for i in rows], dtype=np.int64)
        bos = np.full((len(rows), 1), self.r.bos, dtype=np.int64)
        if self.r.prefixes is None:
            prompts = bos
        else:
            picked = self.r.prefixes[self.r.order[rows % len(self.r.order)]]
            prompts = np.concatenate([bos, picked.astype(np.int64)], axis=1)
        # `prompt_ids`, not `prompt`: vLLM's request schema has a string field of that name.
        return {ROW: rows, "prompt_ids": prompts, "seed": seeds}


def request_rows(requests: Requests):
    import ray.data

    from engine import raydata

    raydata.quiet()
    # Spans of story indices, expanded into requests where they are used. (Not
    # ray.data.range: its read tasks take a whole CPU, which a small machine whose CPUs
    # the chains and sampler actors hold never has free.)
    end = requests.start + requests.n
    spans = [{"start": a, "end": min(end, a + REQUESTS_PER_SPAN)}
             for a in range(requests.start, end, REQUESTS_PER_SPAN)]
    return ray.data.from_items(spans).map_batches(
        _MakeRequests, fn_constructor_args=(requests,), batch_size=1, batch_format="numpy",
        num_cpus=raydata.CHAIN_TASK_CPUS, compute=ray.data.ActorPoolStrategy(size=1))


def listed_requests(prompts: list[list[int]], seeds: list[int]):
    """Requests given as lists (tests, benchmarks): prompts of one length."""
    import ray.data

    from engine import raydata

    raydata.quiet()
    return ray.data.from_items([{ROW: i, "prompt_ids": np.asarray(p, dtype=np.int64),
                                 "seed": int(s)} for i, (p, s) in enumerate(zip(prompts, seeds))])
