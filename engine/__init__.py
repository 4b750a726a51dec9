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
    from engine.spec import load_study as _load

    return _load(path, overrides)


def check_out_directory(study: "Study") -> None:
    """Refuse, before writing anything, a study whose `out` holds a different run."""
    from engine.chain import recorded_trial_mismatch
    from engine.spec import SpecError

    for trial in study.trials():
        mismatch = recorded_trial_mismatch(study.out, trial)
        if mismatch:
            raise SpecError(f"{study.source}: out: {study.out} already holds chain "
                            f"{trial.trial_id} run with other parameters ({mismatch}); "
                            "choose another out (--set out=DIR) or delete that run")


def run_study(study: "Study | str | Path", overrides: Sequence[str] = (),
              address: str | None = None) -> "pd.DataFrame":
    """Run (or resume) every chain of a study; return and save the tidy table."""
    import yaml

    from engine import results
    from engine.cluster import check_fits_cluster, ray_connection
    from engine.files import StorageError, check_writable, write_atomic
    from engine.layout import RunLayout
    from engine.spec import SpecError, Study
    from engine.sweep import run_sweep

    if not isinstance(study, Study):
        study = load_study(study, overrides)
    check_out_directory(study)
    run = RunLayout.of(study.out)  # a path or an object-store URI
    with ray_connection(address or study.resources.address):
        check_fits_cluster(study)
        try:  # a missing bucket, no credentials, a read-only mount: one line, now
            check_writable(run.out)
        except StorageError as e:
            raise SpecError(f"{study.source}: out: {e}") from None
        write_atomic(run.study_file,
                     lambda tmp: tmp.write_text(yaml.safe_dump(study.document, sort_keys=False)))
        run_sweep(study)
    table = results.collect(study)
    results.write(table, run.out)
    return table


def load_results(directory: str | Path) -> "pd.DataFrame":
    from engine.results import load_results as _load

    return _load(directory)


__all__ = ["load_study", "run_study", "load_results"]
