"""`collapse run STUDY --dry-run`: what a study will cost, before it runs.

Counts come from the strategies (rows trained and sampled per generation); a family
that trains neural networks turns rows into tokens and FLOPs (6·N·D to train on D
tokens, 2·N per sampled token), and FLOPs into GPU-hours at a stated MFU.
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


def generation_rows(study: Study) -> pd.DataFrame:
    records = []
    for trial in study.trials():
        family = family_for(trial)
        params = family.config
        cost: Cost = family.cost()
        strategy = strategies.get(trial.strategy)
        T = cost.rows_per_generation
        for g in range(1, trial.generations + 1):
            mix = strategy.mix(g, T)
            trained, sampled = mix.rows, strategy.sample_size(g, T)
            record = {"trial": trial.trial_id, "strategy": trial.strategy, "generation": g,
                      "train_rows": trained, "sample_rows": sampled, **trial.axes}
            if cost.tokens_per_row is not None:
                epochs = getattr(params, "epochs", 1.0)
                budget = getattr(params, "token_budget", None)
                train_tokens = float(budget if budget else trained * cost.tokens_per_row * epochs)
                sample_tokens = float(sampled * cost.tokens_per_row)
                record.update(train_tokens=train_tokens, sample_tokens=sample_tokens,
                              train_flops=6.0 * cost.parameters * train_tokens,
                              sample_flops=2.0 * cost.parameters * sample_tokens)
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


def describe(study: Study, gpu: str = "H100", mfu: float = 0.4) -> str:
    rows = generation_rows(study)
    trials = study.trials()
    first = family_for(trials[0]).cost()
    lines = [f"{study.name}: {len(trials)} chains ({len(study.strategies)} strategies × "
             f"{len(study.grid_points())} grid points × {len(study.seeds)} seeds) × "
             f"{_generations(study)} generations, family {study.family}"]
    if first.note:
        lines.append(first.note)
    tokens = "train_tokens" in rows
    columns = ["train_rows", "sample_rows"] + (["train_tokens", "sample_tokens", "train_flops",
                                                 "sample_flops"] if tokens else [])
    per_gen = rows.groupby("generation")[columns].sum()
    lines.append("\nper generation, summed over chains:")
    lines.append(per_gen.map(_si).to_string())
    total = rows[columns].sum()
    lines.append("\ntotal: " + ", ".join(f"{c.replace('_', ' ')} {_si(total[c])}" for c in columns))
    if tokens:
        peak = GPU_PEAK_BF16[gpu]
        flops = total["train_flops"] + total["sample_flops"]
        hours = flops / (peak * mfu) / 3600
        lines.append(f"compute: {_si(flops)}FLOP = {hours:.3g} GPU-hours on {gpu} at {mfu:.0%} MFU "
                     f"({_si(peak)}FLOP/s bf16 peak); sampling counted at the same MFU")
    return "\n".join(lines)
