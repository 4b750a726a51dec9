"""GPU check, in two layers, on whatever device this machine has.

(a) The inner loops, without Ray (torch, transformers, DeepSpeed and pyarrow only): the
    one DeepSpeed fit loop (engine/fit/loop.py) at the paper's shapes (`gpt2-9m` and
    `llama2-126m`, context 512, 64 blocks per GPU, bf16 where the GPU has it, ZeRO-1;
    the first steps, compilation and allocation, left out of the timing); evaluation
    (engine/families/lm/metrics.py's story_nll at its GPU batch); and sampling at the
    paper's sizes: the engine's deterministic batched sampler (each story's draws from
    its own seed, engine/families/lm/sampling/draws.py) beside transformers' generate
    with one generator for the batch, at batch 512. It prints MFU against the GPU's
    bf16 peak, tokens/s of each phase, and the decode rate of each size in the form
    `collapse run --dry-run --rates` reads (also written by --json).
(b) One miniature generation of each trainable family through the chain's own code
    (`engine.chain.run_chain`: the fit on a Ray Train worker, evaluation, sampling), as
    a study runs it, where Ray is importable; with vLLM installed, the same corpus
    sampled again through vLLM.

    python bench/gpu_check.py                 # GPU sizes
    python bench/gpu_check.py --quick         # tiny sizes: the CPU path the tests run
    python bench/gpu_check.py --json OUT.json # also write the figures
    python bench/gpu_check.py --layers inner  # (a) only

On an offline GPU machine with torch and transformers: `make gpu-wheels` here builds
DeepSpeed (pure Python) and what it needs into gpu-wheels/; there, `pip install
--no-index gpu-wheels/*.whl` and run this with the repository on PYTHONPATH.
Timings are single runs: they show each phase on the device and how fast, not a tuned
benchmark.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINYSTORIES = REPO / "tests" / "data" / "tinystories" / "TinyStories-train-head.txt"
PAPER_VOCAB = 8192  # studies/tinystories_paper.yaml
DECODE_SIZES = ("gpt2-9m", "llama2-12m", "llama2-42m", "llama2-126m")


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses it (the test that hides Ray)
        return False


def bf16_peak(name: str) -> float | None:
    from engine.plan import GPU_PEAK_BF16

    return next((peak for gpu, peak in GPU_PEAK_BF16.items() if gpu in name), None)


# ---------------------------------------------------------------- (a) inner loops

def inner_shapes(quick: bool) -> dict:
    if quick:
        return {"fit": [("tiny", 64, 8, 8, 3)], "vocab": 300, "eval_stories": 32,
                "story_tokens": 40, "decode": [("tiny", 16, 16)]}
    # (size, context, batch per GPU, steps, warm-up steps); (size, batch, new tokens)
    return {"fit": [("gpt2-9m", 512, 64, 60, 15), ("llama2-126m", 512, 64, 40, 10)],
            "vocab": PAPER_VOCAB, "eval_stories": 4096, "story_tokens": 224,
            "decode": [(size, 512, 256) for size in DECODE_SIZES]}


def time_fit(size: str, vocab: int, context: int, batch: int, steps: int, warmup: int,
             zero_stage: int) -> dict:
    """The fit loop on random blocks; the steps after `warmup` timed."""
    import torch

    from engine.families.lm.train import ModelBuilder, lm_loss
    from engine.families.lm.zoo import ZOO, parameter_count
    from engine.fit import LoopConfig, current_device, resolve_precision, train

    device = current_device()
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randint(0, vocab, (batch, context), generator=g) for _ in range(steps))
    marks = {}

    def mark(step, curve, save):
        if step in (warmup, steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    precision = resolve_precision("auto", device)
    cfg = LoopConfig(steps=steps, batch_size=batch, lr=1e-3, precision=precision,
                     zero_stage=zero_stage, log_every=10)
    train(ModelBuilder(size, vocab, context, 0, 0, 1), blocks, lm_loss, cfg, on_step=mark)
    seconds = marks[steps] - marks[warmup]
    tokens = (steps - warmup) * batch * context
    return {"size": size, "parameters": parameter_count(ZOO[size], vocab, context),
            "precision": precision, "zero_stage": zero_stage, "context": context,
            "batch": batch, "timed_steps": steps - warmup,
            "tokens_per_s": tokens / seconds}


def time_evaluation(size: str, vocab: int, stories: int, length: int) -> dict:
    import numpy as np
    import torch

    from engine.families.lm.metrics import story_nll
    from engine.families.lm.zoo import ZOO, build
    from engine.fit import current_device

    device = current_device()
    model = build(ZOO[size], vocab, length + 8, 0, 0, 1, seed=0).to(device).eval()
    rng = np.random.default_rng(0)
    ids = [rng.integers(2, vocab, length).tolist() for _ in range(stories)]
    batch_tokens = 65536 if device.type == "cuda" else 8192  # as evaluate_checkpoint
    story_nll(model, ids[:64], 0, 1, length + 8, batch_tokens)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    story_nll(model, ids, 0, 1, length + 8, batch_tokens)
    seconds = time.perf_counter() - start  # story_nll ends with a copy to the host
    return {"size": size, "tokens_per_s": stories * (length + 1) / seconds,
            "batch_tokens": batch_tokens}


def time_decoding(size: str, vocab: int, batch: int, new_tokens: int) -> dict:
    """The engine's deterministic sampler and transformers' generate (one generator for
    the batch), same model and prompts, every story to the length limit."""
    import torch

    from engine.families.lm.sampling import SampleSettings, generate
    from engine.families.lm.zoo import ZOO, build
    from engine.fit import current_device

    device = current_device()
    never = vocab + 1  # an end-of-text id no model emits
    # fp32 weights, as the hf sampler loads a checkpoint
    model = build(ZOO[size], vocab, new_tokens + 8, 0, 0, 1, seed=0).to(device).eval()
    prompts, seeds = [[0]] * batch, list(range(batch))
    s = SampleSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                       eos=never, batch_size=batch)
    x = torch.tensor(prompts, device=device)

    def engine():
        generate(model, prompts, seeds, s)

    def transformers():
        torch.manual_seed(0)
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                           top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=0, eos_token_id=never)
        if device.type == "cuda":
            torch.cuda.synchronize()

    rates = {}
    for name, run in (("engine", engine), ("transformers", transformers)):
        run()  # warm-up
        start = time.perf_counter()
        run()
        rates[name] = batch * new_tokens / (time.perf_counter() - start)
    return {"size": size, "batch": batch, "new_tokens": new_tokens,
            "engine_tokens_per_s": rates["engine"],
            "transformers_tokens_per_s": rates["transformers"]}


def inner_layer(quick: bool, device: str, say) -> dict:
    shapes = inner_shapes(quick)
    peak = bf16_peak(device)
    fits = []
    for size, context, batch, steps, warmup in shapes["fit"]:
        f = time_fit(size, shapes["vocab"], context, batch, steps, warmup, zero_stage=1)
        f["mfu"] = 6 * f["parameters"] * f["tokens_per_s"] / peak if peak else None
        fits.append(f)
        say(f"fit {size} ({f['parameters'] / 1e6:.1f}M, context {context}, batch {batch}, "
            f"{f['precision']}, ZeRO-{f['zero_stage']}): {f['tokens_per_s']:,.0f} tokens/s"
            + (f", MFU {f['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 (6·N·D)"
               if peak else ""))
    evaluation = time_evaluation(shapes["fit"][-1][0], shapes["vocab"],
                                 shapes["eval_stories"], shapes["story_tokens"])
    say(f"evaluation {evaluation['size']}: {evaluation['tokens_per_s']:,.0f} tokens/s "
        f"(batches of {evaluation['batch_tokens']:,} tokens)")
    decoding = []
    for size, batch, new_tokens in shapes["decode"]:
        d = time_decoding(size, shapes["vocab"], batch, new_tokens)
        decoding.append(d)
        say(f"sampling {size}, batch {batch} × {new_tokens} tokens: engine (per-story "
            f"seeded) {d['engine_tokens_per_s']:,.0f} tokens/s, transformers generate "
            f"(one generator) {d['transformers_tokens_per_s']:,.0f} tokens/s")
    rates = {d["size"]: round(d["engine_tokens_per_s"]) for d in decoding}
    say("decode rates for `collapse run --dry-run --decode-tps`: "
        + ",".join(f"{k}={v}" for k, v in rates.items()))
    return {"fit": fits, "evaluation": evaluation, "decoding": decoding,
            "decode_tps": rates, "mfu": {f["size"]: f["mfu"] for f in fits}}


# ---------------------------------------------------------------- (b) the chain

def family_blocks(quick: bool, gpu: bool) -> dict[str, dict]:
    """The family parameters of each check (the study file's `family:` block)."""
    trainer = {"trainer": "ray", "workers": 1, "cpus_per_worker": 1.0 if gpu else 0.5,
               "gpus_per_worker": 1.0 if gpu else 0.0}
    if quick:
        lm = {"data": "grammar", "stories": 300, "test_stories": 40, "vocab_size": 300,
              "model": "tiny", "context": 64, "max_new_tokens": 24, "batch_size": 8,
              "epochs": 1, "sample_batch_size": 64}
    else:
        lm = {"data": str(TINYSTORIES), "test_stories": 216, "vocab_size": 8192,
              "model": "gpt2-9m", "context": 256, "max_new_tokens": 255, "batch_size": 32,
              "epochs": 1, "sample_batch_size": 256}
    lm.update(trainer, sampler="hf", sampler_actors=1, sampler_cpus=1.0 if gpu else 0.5,
              sampler_gpus=1.0 if gpu else 0.0, checkpoint_minutes=0, log_every=5)
    images = {"data": "digits", "test_images": 297, "epochs": 1 if quick else 20,
              "batch_size": 32 if quick else 64, **trainer}
    diffusion = {"data": "digits", "test_examples": 297, "epochs": 1 if quick else 20,
                 "steps": 10 if quick else 50, "width": 16 if quick else 64,
                 "batch_size": 32 if quick else 64, **trainer}
    return {"lm": lm, "vae": images, "diffusion": diffusion}


def check(family_name: str, block: dict, out: Path, vllm: bool = True) -> dict:
    """One generation through run_chain; the figures the chain and the fit recorded."""
    import pyarrow.compute as pc

    from engine import strategies
    from engine.chain import chain_layout, real_seed, run_chain
    from engine.corpus import CorpusStore
    from engine.families import family_for
    from engine.fit import read_record
    from engine.layout import RunLayout
    from engine.seeds import derive_seed
    from engine.spec import Trial, validate

    study = validate({"name": "gpu_check", "family": {"name": family_name, **block},
                      "strategies": ["replace"], "generations": 1, "sample_last": True,
                      "seeds": [0],
                      "out": str(out)}, source="bench/gpu_check.py")
    trial = study.trials()[0]
    started = time.perf_counter()
    run_chain(trial, 1, study.out)
    total = time.perf_counter() - started
    paths = chain_layout(study.out, trial)
    recorded = json.loads(paths.metrics(1).read_text())
    fit = read_record(paths.model(1).local_path)
    figures = {"family": family_name, "seconds": recorded["seconds"], "total_seconds": total,
               "fit": fit, "metrics": {k: v for k, v in recorded["metrics"].items()
                                       if isinstance(v, float)}}
    family = family_for(trial)
    if family_name == "lm":
        from engine.families.lm.zoo import ZOO, parameter_count

        corpus = CorpusStore(paths.corpus).entry(strategies.synthetic(1))
        real = family.real_data(real_seed(trial), 1,
                                RunLayout.of(study.out).real_cache)
        p = family.config
        n_params = parameter_count(ZOO[p.model], real.vocab_size, p.context)
        train_tokens = fit["loop_steps"] * p.batch_size * p.context * fit["world_size"]
        # every story scored as [EOT] s [EOT]: its tokens and two more
        test_tokens = int(pc.sum(real.test.column("n_tokens")).as_py()) + 2 * real.test.num_rows
        sample_tokens = corpus.stats["mean_length"] * corpus.rows
        figures.update(parameters=n_params, vocab=real.vocab_size,
                       train_tokens_per_s=train_tokens / fit["loop_seconds"],
                       eval_tokens_per_s=test_tokens / recorded["seconds"]["evaluate"],
                       sample_tokens_per_s={"hf": sample_tokens / recorded["seconds"]["sample"]})
        if vllm and installed("vllm"):
            model = family.load_model(paths.model(1))
            vllm = family_for(Trial.from_dict({**trial.to_dict(),
                                               "params": {**trial.params, "sampler": "vllm"}}))
            started = time.perf_counter()
            table = vllm.sample(real, model, corpus.rows,
                                derive_seed(trial.seed, trial.family, 1, "sample-vllm"))
            seconds = time.perf_counter() - started
            figures["seconds"]["sample_vllm"] = seconds
            figures["sample_tokens_per_s"]["vllm"] = \
                int(pc.sum(table.column("n_tokens")).as_py()) / seconds
    else:
        figures["train_examples_per_s"] = (fit["loop_steps"] * block["batch_size"]
                                           * fit["world_size"] / fit["loop_seconds"])
    return figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU, test suite)")
    ap.add_argument("--layers", default="inner,chain",
                    help="inner (the loops without Ray), chain (through Ray), or both")
    ap.add_argument("--families", default="lm,vae,diffusion", help="the chain layer's")
    ap.add_argument("--no-vllm", action="store_true",
                    help="skip the vLLM sampling pass (the test suite proves vLLM elsewhere)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    have_ray = installed("ray")
    layers = a.layers.split(",")
    say = lambda line: print(line, flush=True)  # noqa: E731
    say(f"gpu_check on {device}, {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; "
        f"Ray {'installed' if have_ray else 'not installed'}; vLLM "
        f"{'installed' if installed('vllm') else 'not installed'}")
    figures: dict = {"device": device, "date": time.strftime("%Y-%m-%d"),
                     "torch": torch.__version__}
    if "inner" in layers:
        say("(a) inner loops, without Ray")
        figures["inner"] = inner_layer(a.quick, device, say)
    if "chain" in layers and not have_ray:
        say("(b) the chain through Ray: skipped, Ray is not installed here")
    elif "chain" in layers:
        say("(b) one generation of each family through the chain and Ray")
        figures["results"] = chain_layer(a, gpu, device, say)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=1))
    return figures


def chain_layer(a, gpu: bool, device: str, say) -> list[dict]:
    import ray

    blocks = family_blocks(a.quick, gpu)
    results = []
    ray_started = not ray.is_initialized()
    if ray_started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
            for name in a.families.split(","):
                r = check(name, blocks[name], Path(d) / name, vllm=not a.no_vllm)
                results.append(r)
                say(report(r, device if gpu else None))
    finally:
        if ray_started:
            ray.shutdown()
    return results


def report(r: dict, gpu_name: str | None) -> str:
    s = r["seconds"]
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in s.items())
    lines = [f"{r['family']}: {phases} (chain total {r['total_seconds']:.1f} s); "
             f"fit loop {r['fit']['loop_steps']} steps in {r['fit']['loop_seconds']:.1f} s"]
    if r["family"] == "lm":
        peak = bf16_peak(gpu_name) if gpu_name else None
        tps = r["train_tokens_per_s"]
        mfu = f", MFU {6 * r['parameters'] * tps / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" \
            if peak else ""
        lines.append(f"  {r['parameters'] / 1e6:.2f}M parameters (vocabulary {r['vocab']}): "
                     f"training {tps:,.0f} tokens/s{mfu}")
        lines.append(f"  evaluation {r['eval_tokens_per_s']:,.0f} tokens/s; sampling " +
                     ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in
                               r["sample_tokens_per_s"].items()))
        lines.append(f"  test_loss {r['metrics']['test_loss']:.3f}")
    else:
        lines.append(f"  training {r['train_examples_per_s']:,.0f} examples/s; "
                     f"test_loss {r['metrics']['test_loss']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
