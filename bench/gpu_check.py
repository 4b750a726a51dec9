"""GPU check: one miniature generation of each trainable family through the chain's
own code, timed phase by phase on whatever device this machine has.

For each of lm (the paper's `gpt2-9m` shape, on the TinyStories sample shipped in
tests/data), vae and diffusion (scikit-learn's digits): `engine.chain.run_chain` runs
one generation — the family's fit on a Ray Train worker (engine.fit's loop under a
TorchTrainer), evaluation on the real test set, sampling (the `hf` backend in a Ray Data
actor pool; the image families sample in the chain's process) — and the script reads
back what the chain recorded. It needs the engine's own dependencies (Ray, DeepSpeed). For lm it then samples the same corpus again with vLLM where vLLM is
installed. It prints seconds per phase, training tokens/s and MFU against the bf16
peak of the GPU it finds, evaluation and sampling tokens/s.

    python bench/gpu_check.py            # GPU sizes
    python bench/gpu_check.py --quick    # tiny sizes: the CPU path the test suite runs
    python bench/gpu_check.py --json OUT.json   # also write the figures
    python bench/gpu_check.py --families lm --no-vllm   # a part of it

Timings are single runs of a miniature study: they show that each phase runs on the
device and roughly how fast, not a tuned benchmark.
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


def bf16_peak(name: str) -> float | None:
    from engine.plan import GPU_PEAK_BF16

    return next((peak for gpu, peak in GPU_PEAK_BF16.items() if gpu in name), None)


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
        if vllm and importlib.util.find_spec("vllm") is not None:
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


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU, test suite)")
    ap.add_argument("--families", default="lm,vae,diffusion")
    ap.add_argument("--no-vllm", action="store_true",
                    help="skip the vLLM sampling pass (the test suite proves vLLM elsewhere)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)

    import ray
    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    blocks = family_blocks(a.quick, gpu)
    print(f"gpu_check on {device}; torch {torch.__version__}, ray {ray.__version__}; vLLM "
          f"{'installed' if importlib.util.find_spec('vllm') else 'not installed'}", flush=True)
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
                print(report(r, device if gpu else None), flush=True)
    finally:
        if ray_started:
            ray.shutdown()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "results": results}, indent=1))
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
