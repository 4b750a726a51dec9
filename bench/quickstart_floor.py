"""The engine's overhead on the quickstart: the study through `collapse run`, then the
same work as plain loops, side by side in one run.

  engine  `collapse run studies/quickstart.yaml` (Ray, Tune, the corpus store, every
          statistic), wall time from start to the results table
  bare    the same fits (model, mix, steps, batch), evaluations and samplings (models,
          stories, seeds, lengths) as plain loops over the engine's inner functions
          (engine.fit.loop.train, metrics.evaluate_checkpoint, sampling.generate) in two
          worker processes without Ray, two chains at a time as the study runs them
          (generation 1 once, first); its inputs are what the engine's run stored (the
          mixes its chains read, its models), so both sides do the same work

Prints each side's seconds per phase (summed over chains; generation 1 once) and
`engine / bare: R` (wall over wall; goal R <= 1.3).

    python bench/quickstart_floor.py [--study studies/quickstart.yaml] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("fit", "evaluate", "sample")


def engine_side(study: str, out: Path) -> tuple[float, dict[str, float]]:
    collapse = Path(sys.executable).parent / "collapse"
    start = time.perf_counter()
    r = subprocess.run([str(collapse), "run", study, "--set", f"out={out}"],
                       capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"collapse run failed:\n{r.stderr[-3000:]}")
    phases = dict.fromkeys(PHASES, 0.0)
    for metrics in out.glob("trials/*/metrics/gen-*.json"):
        for k, v in json.loads(metrics.read_text())["seconds"].items():
            if k in phases:
                phases[k] += v
    return wall, phases


def plan(study_file: str, out: Path) -> tuple[list[list[dict]], dict]:
    """The bare side's work, read back from the engine's run: per chain (in the order
    Tune starts them), per generation, what to fit, evaluate and sample."""
    from engine import strategies
    from engine.chain import chain_layout
    from engine.corpus import CorpusStore
    from engine.families import family_for
    from engine.seeds import derive_seed
    from engine.spec import load_study

    study = load_study(study_file, [f"out={out}"])
    chains, first_done = [], set()
    for trial in study.trials():
        family = family_for(trial)
        p = family.config
        paths = chain_layout(out, trial)
        store = CorpusStore(paths.corpus)
        strategy = strategies.resolve(trial.strategy, trial.workflow)
        point = (trial.seed, trial.family, sorted(family.stated(trial.params).items()))
        T = store.entry(strategies.real(1)).rows
        work = []
        for g in range(1, trial.generations + 1):
            # generation 1 is fit and sampled once for the chains that share it
            shared = g == 1 and (T, repr(family.fit_params())) in first_done
            first_done.add((T, repr(family.fit_params())))
            synth = strategies.synthetic(g)
            sampled = store.entry(synth).rows if store.has(synth) else 0
            fit = json.loads((paths.model(g).local_path / "fit.json").read_text())
            work.append({"chain": trial.trial_id, "generation": g, "shared": shared,
                         "corpus": str(paths.corpus.local_path), "mix": strategy.mix(g, T),
                         "mix_seed": derive_seed(*point, g, "mix"), "steps": fit["steps"],
                         "model": str(paths.model(g).local_path), "sample": sampled,
                         "sample_seed": derive_seed(*point, g, "sample")})
        chains.append(work)
    family = family_for(study.trials()[0])
    p = family.config
    settings = {"context": p.context, "batch_size": p.batch_size, "threads": p.threads or 1,
                "temperature": p.temperature, "max_new_tokens": min(p.max_new_tokens,
                                                                    p.context - 1),
                "sample_batch_size": p.sample_batch_size, "model": p.model, "lr": p.lr,
                "warmup": p.warmup, "weight_decay": p.weight_decay,
                "precision": p.precision, "log_every": p.log_every,
                "test": str(next(out.glob("real/*/corpus")))}
    return chains, settings


def run_generation(item: dict, s: dict) -> dict[str, float]:
    """One generation's fit, evaluation and sampling as plain loops in this process."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from engine.corpus import CorpusStore
    from engine.families.lm import metrics, train
    from engine.families.lm.prepare import TEST
    from engine.families.lm.sampling import SampleSettings, generate
    from engine.families.lm.tokenizer import load_tokenizer
    from engine.fit import LoopConfig
    from engine.fit import train as fit_loop
    from engine.seeds import derive_seed

    torch.set_num_threads(s["threads"])
    tok = load_tokenizer(item["model"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seconds = dict.fromkeys(PHASES, 0.0)
    if not item["shared"]:
        start = time.perf_counter()
        mix = CorpusStore(item["corpus"]).read(item["mix"], item["mix_seed"])
        rng = np.random.default_rng(0)

        def batches():
            while True:  # shuffled stories, packed, epoch after epoch
                ids = mix.column("ids").to_pylist()
                blocks = train.pack_blocks([ids[i] for i in rng.permutation(len(ids))],
                                           s["context"], eos)
                for k in range(0, len(blocks) - s["batch_size"] + 1, s["batch_size"]):
                    yield torch.from_numpy(blocks[k:k + s["batch_size"]])

        cfg = LoopConfig(steps=item["steps"], batch_size=s["batch_size"], lr=s["lr"],
                         warmup=s["warmup"], weight_decay=s["weight_decay"],
                         betas=(0.9, 0.95), grad_clip=1.0, precision=s["precision"],
                         log_every=s["log_every"], threads=s["threads"])
        fit_loop(train.ModelBuilder(s["model"], len(tok), s["context"], eos, eos, pad),
                 batches(), train.lm_loss, cfg)
        seconds["fit"] = time.perf_counter() - start
    if item.get("evaluate", True):
        start = time.perf_counter()
        test = CorpusStore(s["test"]).table(TEST)
        metrics.evaluate_checkpoint(item["model"], test, eos, pad, s["context"], s["threads"])
        seconds["evaluate"] = time.perf_counter() - start
    if item["sample"] and not item["shared"]:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(item["model"],
                                                     dtype=torch.float32).eval()
        settings = SampleSettings(temperature=s["temperature"], top_k=0, top_p=1.0,
                                  max_new_tokens=s["max_new_tokens"], eos=eos,
                                  batch_size=s["sample_batch_size"])
        n, size = item["sample"], s["sample_batch_size"]
        for first in range(0, n, size):
            rows = range(first, min(n, first + size))
            generate(model, [[eos]] * len(rows),
                     [derive_seed(item["sample_seed"], i) for i in rows], settings)
        seconds["sample"] = time.perf_counter() - start
    return seconds


def run_chain(args) -> dict[str, float]:
    work, s = args
    total = dict.fromkeys(PHASES, 0.0)
    for item in work:
        for k, v in run_generation(item, s).items():
            total[k] += v
    return total


def bare_side(chains: list[list[dict]], s: dict) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    phases = dict.fromkeys(PHASES, 0.0)
    # generation 1 first (every chain waits for it), then the chains two at a time,
    # the next chain starting wherever one ends
    # (each chain evaluates its own generation 1, below)
    firsts = [{**c[0], "evaluate": False} for c in chains if not c[0]["shared"]]
    for k, v in run_chain((firsts, s)).items():
        phases[k] += v
    rest = [([{**c[0], "shared": True}] + c[1:], s) for c in chains]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for done in pool.imap_unordered(run_chain, rest):
            for k, v in done.items():
                phases[k] += v
    return time.perf_counter() - start, phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="studies/quickstart.yaml")
    ap.add_argument("--keep", default=None, help="keep the engine's run in this directory")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quickstart-floor-") as d:
        out = Path(a.keep or d) / "run"
        print(f"quickstart floor: {a.study} on {os.cpu_count()} CPUs, "
              f"{time.strftime('%Y-%m-%d')}", flush=True)
        engine_wall, engine_phases = engine_side(a.study, out)
        print(f"  engine: collapse run in {engine_wall:.0f} s", flush=True)
        chains, settings = plan(a.study, out)
        bare_wall, bare_phases = bare_side(chains, settings)
        print(f"  bare:   the same work as plain loops in {bare_wall:.0f} s")
    print(f"  {'seconds':12s} {'engine':>8s} {'bare':>8s}")
    for phase in PHASES:
        print(f"  {phase:12s} {engine_phases[phase]:8.1f} {bare_phases[phase]:8.1f}")
    print(f"  {'wall':12s} {engine_wall:8.1f} {bare_wall:8.1f}")
    print("  (phases summed over chains, each chain on one core; the engine's wall also "
          "holds Ray's start, preparing the data, the corpus statistics and the table)")
    print(f"engine / bare: {engine_wall / bare_wall:.2f}")


if __name__ == "__main__":
    main()
