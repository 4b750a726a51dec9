"""Beam search on vLLM, which Ray Data's LLM processor does not offer: a pool of
`vllm.LLM` engines, each running `LLM.beam_search` on batches of prompts."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW
from engine.families.lm.sampling.base import Sampler, SampleSettings, story_rows
from engine.families.lm.sampling.vllm import cpu_env


class VLLMBeamSearcher:
    """Ray Data actor: a `vllm.LLM` engine over the checkpoint, loaded once. vLLM scores
    beams by the model's own log-probabilities (its default raw logprobs mode), which
    each story records; its beam search has no repetition penalty (`choose_backend`
    sends those to hf)."""

    def __init__(self, model_dir: str, settings: dict[str, Any], max_model_len: int,
                 on_cpu: bool, progress: str | None = None):
        from vllm import LLM

        from engine.families.lm.tokenizer import load_tokenizer
        from engine.files import local_copy
        from engine.progress import RowsProgress

        model_dir = str(local_copy(model_dir))
        self.settings = SampleSettings(**settings)
        self.llm = LLM(model=model_dir, max_model_len=max_model_len, enforce_eager=on_cpu,
                       dtype="float32" if on_cpu else "bfloat16", seed=0)
        self.tokenizer = load_tokenizer(model_dir)
        self.progress = RowsProgress(progress)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from vllm import TokensPrompt
        from vllm.sampling_params import BeamSearchParams

        s = self.settings
        prompts = [list(map(int, p)) for p in batch["prompt_ids"]]
        found = self.llm.beam_search([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     BeamSearchParams(beam_width=s.beams,
                                                      max_tokens=s.max_new_tokens))
        rows = []
        for prompt, out in zip(prompts, found):
            best = out.sequences[0]  # sorted best first
            new = list(best.tokens[len(prompt):])
            finished = bool(new) and new[-1] == s.eos
            rows.append({"ids": new[:-1] if finished else new,
                         "logprob": float(best.cum_logprob), "finished": finished})
        self.progress.add(len(rows))
        return story_rows(batch[ROW], prompts, rows, self.tokenizer)


class VLLMBeamBackend(Sampler):
    name = "vllm"  # the backend a study names; beams > 1 picks this implementation

    def rows(self, requests):
        import ray.data

        on_cpu = not self.gpus_per_actor
        s = self.settings
        return requests.map_batches(
            VLLMBeamSearcher,
            fn_constructor_kwargs={"model_dir": self.model_dir, "settings": s.as_dict(),
                                   "max_model_len": max(self.prompt_length + s.max_new_tokens,
                                                        64),
                                   "on_cpu": on_cpu, "progress": self.progress},
            batch_size=s.batch_size, compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor or None,
            batch_format="numpy", runtime_env={"env_vars": cpu_env() if on_cpu else {}})
