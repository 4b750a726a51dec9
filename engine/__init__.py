"""Collapse study engine: generations of models trained on their predecessors' samples.

    import engine
    table = engine.run_study("studies/linear_regression.yaml", overrides=["generations=5"])
    table = engine.load_results("results/linear_regression")
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from engine.spec import Study


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> "Study":
    """A study file, validated, with `--set`-style overrides applied."""
    from engine.spec import load_study as _load

    return _load(path, overrides)


def run_study(study: "Study | str | Path", overrides: Sequence[str] = (), **kw) -> "pd.DataFrame":
    """Run (or resume) every chain of a study; the tidy table (engine/run.py)."""
    from engine.run import run_study as _run

    return _run(study, overrides, **kw)


def load_results(directory: str | Path) -> "pd.DataFrame":
    """A finished study's tidy table (results.parquet), checked as it is read."""
    from engine.results import load_results as _load

    return _load(directory)


__all__ = ["load_study", "run_study", "load_results"]
