"""Ray Train settings the engine uses wherever it builds a TorchTrainer."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# The RunConfig callbacks of the fits this process runs: a Tune trial's
# TuneReportCallback while a chain of `collapse run` runs here (see
# engine/sweep.py), none when a fit is called directly (tests, benchmarks).
_callbacks: list = []


@contextmanager
def fit_callbacks(callbacks: list) -> Iterator[None]:
    """Give every fit started inside the block these RunConfig callbacks."""
    global _callbacks
    saved, _callbacks = _callbacks, list(callbacks)
    try:
        yield
    finally:
        _callbacks = saved


def run_callbacks() -> list:
    return list(_callbacks)


def report_model(metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
    """A Ray Train worker's last report: rank 0 saves the trained model into a
    directory and reports it as the fit's checkpoint, which Ray Train puts in the run's
    storage whichever node rank 0 ran on (the caller reads `result.checkpoint`); every
    other worker reports the metrics alone, since a report is collective."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save(Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
