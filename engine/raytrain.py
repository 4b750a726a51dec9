"""Ray Train settings the engine uses wherever it builds a TorchTrainer."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
