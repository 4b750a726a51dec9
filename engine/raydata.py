"""Ray Data settings the engine uses wherever it builds a Dataset."""
from __future__ import annotations

import logging


def quiet() -> None:
    """No per-dataset progress bars or execution banners: the engine prints one line per
    generation, and Ray Data's console output would drown it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
