"""The vLLM backend: Ray Data's LLM processor (`ray.data.llm.build_processor` with
`vLLMEngineProcessorConfig`), each engine loading the generation's checkpoint once.

Each story's draws come from its own seed without a random generator per request:
vLLM v1 draws a seeded request's noise one request at a time (`random_sample` in
vllm/v1/sample/ops/topk_topp_sampler.py) and leaves its fast samplers for it. Instead
every request is sent greedy (temperature 0, no seed) with the real settings in
`extra_args`, and `StoryDraws`, a vLLM v1 logits processor loaded into each engine,
draws the whole batch's next tokens in one step the way the hf backend does
(engine/families/lm/sampling/draws.py: the same u(seed, position), the same filtering),
then leaves each row one finite logit: its drawn token's log-probability under the
tempered, penalised, filtered distribution. vLLM's greedy pick is that token, and its
`processed_logits` log-probability mode hands back that value, which is what each
story records."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW
from engine.families.lm.sampling.base import Sampler, story_rows

# The FQCN vLLM loads the processor by, in every engine process.
STORY_DRAWS = "engine.families.lm.sampling.vllm:StoryDraws"
# The request's `extra_args` key that carries its story's settings.
STORY = "collapse_story"

try:  # the processor subclasses vLLM's interface; this module imports without vLLM
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, \
        MoveDirectionality
except ImportError:  # pragma: no cover - vLLM not installed: only the hf backend runs
    LogitsProcessor = object
    BatchUpdate = MoveDirectionality = None


def story_params(settings, seed: int) -> dict[str, Any]:
    """The SamplingParams of one story: greedy for vLLM, its draws for StoryDraws."""
    return {"temperature": 0.0, "max_tokens": settings.max_new_tokens,
            "stop_token_ids": [settings.eos], "logprobs": 0,
            "extra_args": {STORY: {
                "seed": int(seed), "temperature": float(settings.temperature),
                "top_k": int(settings.top_k), "top_p": float(settings.top_p),
                "repetition_penalty": float(settings.repetition_penalty)}}}


class StoryDraws(LogitsProcessor):
    """vLLM v1 logits processor: each story's next token drawn from its own
    u(seed, position), for the whole batch in one step (see the module doc). Rows
    without the story settings in their `extra_args` pass untouched."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        rows = vllm_config.scheduler_config.max_num_seqs
        self.device = device
        self.active: dict[int, tuple] = {}  # batch index -> (settings, prompt, outputs)
        # per batch index: seed, temperature, top_k, top_p, penalty
        self.seed = np.zeros(rows, dtype=np.int64)
        self.params = np.zeros((rows, 4), dtype=np.float64)
        self.seen = None  # (rows, vocabulary) bool on the device, once a penalty is used
        self.seen_count = np.zeros(rows, dtype=np.int64)  # output tokens already in `seen`
        self.rows = rows

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    @classmethod
    def validate_params(cls, params) -> None:
        story = (params.extra_args or {}).get(STORY)
        if story is not None and params.temperature != 0.0:
            raise ValueError(f"{STORY}: a story drawn by StoryDraws is sent greedy "
                             "(temperature 0); its own temperature is in extra_args")

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.active.pop(i, None)
        for i, params, prompt, output in batch_update.added:
            story = (params.extra_args or {}).get(STORY)
            if story is None:
                self.active.pop(i, None)
                continue
            self.active[i] = (story, list(prompt or []), output)
            self.seed[i] = int(story["seed"]) & (2**63 - 1)
            self.params[i] = (story["temperature"], story["top_k"], story["top_p"],
                              story["repetition_penalty"])
            self.seen_count[i] = -1  # `seen` is filled from the prompt when next applied
        for a, b, direction in batch_update.moved:
            self._move(a, b, direction == MoveDirectionality.SWAP)

    def _move(self, a: int, b: int, swap: bool) -> None:
        moved = self.active.pop(a, None)
        other = self.active.pop(b, None)
        if moved is not None:
            self.active[b] = moved
        if swap and other is not None:
            self.active[a] = other
        for values in (self.seed, self.params, self.seen_count):
            values[[a, b]] = values[[b, a]] if swap else values[[a, a]]
        if self.seen is not None:
            self.seen[[a, b]] = self.seen[[b, a]] if swap else self.seen[[a, a]]

    def apply(self, logits):
        import torch

        from engine.families.lm.sampling.draws import (draw, filtered_logprobs, greedy,
                                                       penalise, uniforms_at)

        if not self.active:
            return logits
        index = np.fromiter(sorted(i for i in self.active if i < logits.shape[0]),
                            dtype=np.int64)
        if not len(index):
            return logits
        # the position each row draws: the tokens it has generated so far
        positions = np.fromiter((len(self.active[i][2]) for i in index), dtype=np.int64)
        u = torch.from_numpy(uniforms_at(self.seed[index], positions)).to(self.device,
                                                                          non_blocking=True)
        params = self.params[index]
        temperature, top_k, top_p, penalty = (self._setting(params[:, j], integer=j == 1)
                                              for j in range(4))
        rows = torch.from_numpy(index).to(self.device)
        whole = len(index) == logits.shape[0]
        chosen = logits if whole else logits[rows]
        seen = self._seen(index, chosen.shape[1]) if (params[:, 3] != 1.0).any() else None
        greedy_rows = params[:, 0] == 0
        if greedy_rows.all():
            token, lp = greedy(chosen if seen is None else penalise(chosen, penalty, seen))
        else:
            safe_t = temperature if not isinstance(temperature, torch.Tensor) else \
                torch.where(temperature == 0, 1.0, temperature)
            token, lp = draw(filtered_logprobs(chosen, safe_t, top_k, top_p, penalty, seen), u)
            if greedy_rows.any():
                g_token, _ = greedy(chosen if seen is None else penalise(chosen, penalty, seen))
                mask = torch.from_numpy(greedy_rows).to(self.device)
                token, lp = torch.where(mask, g_token, token), torch.where(mask, 0.0, lp)
        forced = torch.full_like(chosen, float("-inf"))
        forced.scatter_(1, token[:, None], lp[:, None].to(forced.dtype))
        if whole:
            return forced
        logits[rows] = forced
        return logits

    def _setting(self, column: np.ndarray, integer: bool = False):
        """A setting as one number when every row shares it (the usual case: the fast
        paths of filtered_logprobs), else a column tensor of one value per row."""
        import torch

        if (column == column[0]).all():
            return int(column[0]) if integer else float(column[0])
        values = column[:, None].astype(np.int64 if integer else np.float32)
        return torch.from_numpy(values).to(self.device, non_blocking=True)

    def _seen(self, index: np.ndarray, vocab: int):
        """Which tokens each row's story holds (its prompt's included), kept up to date
        from the tokens generated since the last step."""
        import torch

        if self.seen is None:
            self.seen = torch.zeros((self.rows, vocab), dtype=torch.bool, device=self.device)
        rows, tokens = [], []
        for i in index:
            _, prompt, output = self.active[i]
            if self.seen_count[i] < 0:  # a new request: its prompt and what it has so far
                self.seen[i] = False
                new, self.seen_count[i] = prompt + list(output), len(output)
            else:
                new = output[self.seen_count[i]:]
                self.seen_count[i] = len(output)
            rows.extend([i] * len(new))
            tokens.extend(new)
        if tokens:
            self.seen[torch.tensor(rows, device=self.device),
                      torch.tensor(tokens, device=self.device)] = True
        return self.seen[torch.from_numpy(index).to(self.device)]


class _Decode:
    """Ray Data batch function after the vLLM engines: story ids and text, decoded the
    way the hf backend decodes them."""

    def __init__(self, model_dir: str, eos: int, progress: str | None = None):
        from engine.progress import RowsProgress

        self.model_dir, self.eos, self.tokenizer = model_dir, eos, None
        self.progress = RowsProgress(progress)  # the stories the engines finished

    def __call__(self, raw: pa.Table) -> pa.Table:
        if self.tokenizer is None:
            from engine.families.lm.tokenizer import load_tokenizer
            from engine.files import local_copy

            self.tokenizer = load_tokenizer(str(local_copy(self.model_dir)))
        gen = [[t for t in g if t != self.eos] for g in raw.column("generated").to_pylist()]
        rows = [{"ids": g, "logprob": lp, "finished": f} for g, lp, f in
                zip(gen, raw.column("logprob").to_pylist(), raw.column("finished").to_pylist())]
        prompts = [list(p) for p in raw.column("prompt_ids").to_pylist()]
        self.progress.add(len(rows))
        return story_rows(raw.column(ROW).to_numpy(), prompts, rows, self.tokenizer)


def token_logprobs(row) -> list[float]:
    """Each generated token's log-probability: vLLM returns, per position, a mapping
    token id → {logprob, rank, ...} holding the sampled token (and any top alternatives)."""
    values = []
    for token, entry in zip(row["generated_tokens"],
                            row.get("logprobs") or row.get("generated_logprobs") or []):
        if not isinstance(entry, dict):
            values.append(float(entry))
            continue
        info = entry.get(int(token), entry.get(str(int(token))))
        if info is None and len(entry) == 1:
            info = next(iter(entry.values()))
        if info is not None:
            values.append(float(info["logprob"] if isinstance(info, dict) else info))
    return values


def cpu_env() -> dict[str, str]:
    """vLLM-CPU refuses to start without a KV-cache size (GiB); engine actors get it
    through their runtime env, since they do not inherit this process's variables."""
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


class VLLMBackend(Sampler):
    """vLLM engines through Ray Data's LLM processor; every draw by StoryDraws."""

    name = "vllm"

    def rows(self, requests):
        import ray.data
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        from engine import raydata

        s, on_cpu = self.settings, not self.gpus_per_actor
        config = vLLMEngineProcessorConfig(
            # A path on shared storage, or an s3:// / gs:// URI that Ray's LLM processor
            # downloads on each node its engines run on.
            model_source=self.model_dir,
            engine_kwargs={"max_model_len": max(self.prompt_length + s.max_new_tokens, 64),
                           "enforce_eager": on_cpu,
                           "dtype": "float32" if on_cpu else "bfloat16", "seed": 0,
                           "logits_processors": [STORY_DRAWS],
                           # the value StoryDraws leaves on the drawn token: its
                           # log-probability under the distribution it was drawn from
                           "logprobs_mode": "processed_logits"},
            concurrency=self.actors,
            batch_size=s.batch_size,
            runtime_env={"env_vars": cpu_env() if on_cpu else {}},
            log_engine_metrics=False,  # its metrics import ray.serve
            # Prompts go in as token ids and stories come back as ids (decoded after, the
            # same way as the hf backend): no chat template, no tokenizer stages.
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
            # On CPUs the engine's placement group holds the study's sampler_cpus; without
            # a CPU-only bundle the processor waits forever for a GPU.
            **({"placement_group_config": {"bundles": [{"CPU": self.cpus_per_actor}]}}
               if on_cpu else {}),
        )

        def preprocess(row):
            return {"tokenized_prompt": [int(t) for t in row["prompt_ids"]],
                    "sampling_params": story_params(s, int(row["seed"]))}

        def postprocess(row):
            generated = [int(t) for t in row["generated_tokens"]]
            # Ray's processor returns no finish reason. vLLM keeps a stop token in the
            # output it ends on (v1/core/sched/utils.py: check_stop), so a story that
            # ended with EOT rather than at the length limit is one whose last token is EOT.
            return {ROW: row[ROW], "prompt_ids": row["prompt_ids"], "generated": generated,
                    "logprob": float(sum(token_logprobs(row))),
                    "finished": bool(generated) and generated[-1] == s.eos}

        # The pre/post-process stages are Ray Data map tasks; at their default of 1 CPU
        # they never get scheduled on a small machine whose CPUs are held by the chain
        # drivers and the engine's own bundle (engine/raydata.py: CHAIN_TASK_CPUS).
        light = {"num_cpus": raydata.CHAIN_TASK_CPUS}
        processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                    preprocess_map_kwargs=light, postprocess_map_kwargs=light)
        # batch_size 256: the decoder's progress moves in steps of at most that many stories.
        return processor(requests).map_batches(
            _Decode, fn_constructor_args=(self.model_dir, s.eos, self.progress),
            batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=raydata.CHAIN_TASK_CPUS)
