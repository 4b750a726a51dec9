"""`collapse run STUDY --dry-run`: what a study will cost, before it runs.

Counts come from the strategies (rows trained and sampled per generation), less the
work chains share (generation 1 is fit once per model and its corpus sampled once per
temperature: engine/chain.py). A family that trains neural networks turns rows into
tokens and FLOPs (6·N·D to train on D tokens, 2·N per token evaluated) and into time:
training and evaluation at a stated MFU; sampling at a decoding throughput (tokens/s per
GPU by model size: batched decoding of small models is bound by per-step overheads, not
FLOPs, so an MFU overstates it 10-30x); plus a fixed start-up per generation.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from engine import strategies
from engine.families import family_for
from engine.spec import Study

# Dense bf16 peak, FLOP/s (vendor datasheets, without sparsity).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                 "A10G": 125e12, "L4": 121e12, "B200": 2250e12}


@dataclass(frozen=True)
class Cost:
    """A family's conversion from rows to compute, for one grid point."""

    rows_per_generation: int  # T
    tokens_per_row: float | None  # None: not a token model (rows only)
    parameters: int | None
    note: str = ""
    test_rows: int = 0  # held-out rows evaluated every generation
    # The training rows the real data holds (None: drawn afresh, or not read for a plan),
    # and the family's field that states T: a strategy reading fresh real data needs a
    # chunk of T rows per generation.
    real_rows: int | None = None
    rows_field: str = ""


# Assumed decoding throughput, tokens/s per H100 (vLLM, bf16, batches of hundreds of
# stories), by parameter count; other GPUs scaled by their bf16 peak. Assumptions, not
# measurements: bench/gpu_check.py measures yours; pass it as --decode-tps.
DECODE_TPS_H100 = ((20e6, 100_000), (50e6, 80_000), (150e6, 50_000))


def decode_tps(parameters: int, gpu: str) -> float:
    scale = GPU_PEAK_BF16[gpu] / GPU_PEAK_BF16["H100"]
    for most, tps in DECODE_TPS_H100:
        if parameters <= most:
            return tps * scale
    return 0.1 * GPU_PEAK_BF16[gpu] / (2 * parameters)  # larger: FLOP-bound at 10%


def generation_rows(study: Study) -> pd.DataFrame:
    """One row per chain and generation: rows (and tokens, FLOPs) trained, sampled and
    evaluated; `shared` marks generation-1 work another chain does for it."""
    records = []
    fits_seen, samples_seen = set(), set()
    for trial in study.trials():
        family = family_for(trial)
        params = family.config
        cost: Cost = family.cost()
        strategy = strategies.resolve(trial.strategy, trial.workflow)
        T = cost.rows_per_generation
        chunks = strategy.real_chunks(trial.generations)
        if cost.real_rows is not None and chunks * T > cost.real_rows:
            raise ValueError(f"{study.source}: family.{cost.rows_field}: strategy "
                             f"{trial.strategy} reads {chunks} real chunk(s) of T = {T} "
                             f"rows; the data has {cost.real_rows}: set {cost.rows_field} "
                             f"to at most {cost.real_rows // chunks}")
        for g in range(1, trial.generations + 1):
            mix = strategy.mix(g, T)
            sampled = strategy.sample_size(g, T) if g < trial.generations or trial.sample_last else 0
            trained = mix.rows
            fit_shared = sample_shared = False
            if g == 1:  # as the chain shares it: one fit per fit key, one sample per point
                fit_key = (trial.seed, repr(sorted(family.fit_params().items())), T)
                sample_key = (trial.seed, repr(sorted(trial.params.items())), T, sampled)
                fit_shared, sample_shared = fit_key in fits_seen, sample_key in samples_seen
                fits_seen.add(fit_key)
                samples_seen.add(sample_key)
            record = {"trial": trial.trial_id, "strategy": trial.strategy, "generation": g,
                      "train_rows": 0 if fit_shared else trained,
                      "sample_rows": 0 if sample_shared else sampled,
                      "shared_rows": (trained if fit_shared else 0)
                      + (sampled if sample_shared else 0), **trial.axes}
            if cost.tokens_per_row is not None:
                epochs = getattr(params, "epochs", 1.0)
                budget = getattr(params, "token_budget", None)
                train_tokens = 0.0 if fit_shared else float(
                    budget if budget else trained * cost.tokens_per_row * epochs)
                sample_tokens = float(record["sample_rows"] * cost.tokens_per_row)
                eval_tokens = float(cost.test_rows * cost.tokens_per_row)
                record.update(train_tokens=train_tokens, sample_tokens=sample_tokens,
                              eval_tokens=eval_tokens, parameters=cost.parameters,
                              train_flops=6.0 * cost.parameters * train_tokens,
                              eval_flops=2.0 * cost.parameters * eval_tokens)
            records.append(record)
    return pd.DataFrame(records)


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _generations(study: Study) -> str:
    counts = set(study.generations.values())
    if len(counts) == 1:
        return str(counts.pop())
    return "(" + ", ".join(f"{s}: {n}" for s, n in study.generations.items()) + ")"


def describe(study: Study, gpu: str = "H100", mfu: float = 0.4,
             decode: float | None = None, startup: float = 60.0) -> str:
    rows = generation_rows(study)
    trials = study.trials()
    first = family_for(trials[0]).cost()
    lines = [f"{study.name}: {len(trials)} chains ({len(study.strategies)} strategies × "
             f"{len(study.grid_points())} grid points × {len(study.seeds)} seeds) × "
             f"{_generations(study)} generations, family {study.family}"]
    if first.note:
        lines.append(first.note)
    tokens = "train_tokens" in rows
    columns = ["train_rows", "sample_rows"] + (["train_tokens", "sample_tokens", "train_flops"]
                                                if tokens else [])
    per_gen = rows.groupby("generation")[columns].sum()
    lines.append("\nper generation, summed over chains (generation 1's shared work once):")
    lines.append(per_gen.map(_si).to_string())
    total = rows[columns].sum()
    lines.append("\ntotal: " + ", ".join(f"{c.replace('_', ' ')} {_si(total[c])}" for c in columns))
    shared = rows["shared_rows"].sum()
    if shared:
        lines.append(f"shared: generation 1 is fit once per model and sampled once per "
                     f"temperature, which saves {_si(shared)} rows of work "
                     f"({shared / (shared + total['train_rows'] + total['sample_rows']):.0%})")
    if tokens:
        peak = GPU_PEAK_BF16[gpu]
        train_h = total["train_flops"] / (peak * mfu) / 3600
        eval_h = rows["eval_flops"].sum() / (peak * mfu) / 3600
        tps = rows["parameters"].map(lambda n: decode or decode_tps(int(n), gpu))
        sample_h = (rows["sample_tokens"] / tps).sum() / 3600
        start_h = len(rows) * startup / 3600
        hours = train_h + eval_h + sample_h + start_h
        how = (f"{decode:,.0f} tokens/s (--decode-tps)" if decode else
               "an assumed decoding throughput by model size, "
               f"{decode_tps(int(rows['parameters'].iloc[0]), gpu):,.0f} tokens/s per GPU for "
               f"{_si(rows['parameters'].iloc[0])} parameters (measure yours with "
               "bench/gpu_check.py and pass --decode-tps)")
        lines.append(f"time: {hours:.3g} GPU-hours on {gpu}: training {train_h:.3g} and "
                     f"evaluation {eval_h:.3g} at {mfu:.0%} MFU ({_si(peak)}FLOP/s bf16 peak), "
                     f"sampling {sample_h:.3g} at {how}, start-up {start_h:.3g} "
                     f"({startup:.0f} s a generation, --startup-seconds)")
    return "\n".join(lines)
