"""Ray Data settings the engine uses wherever it builds a Dataset."""
from __future__ import annotations

import logging

# CPUs each Ray Data task asks for. Its tasks here (read shards, select rows, shuffle,
# pack token blocks) are light next to training, and at the default of 1 CPU they
# cannot be scheduled on a small machine whose CPUs are held by chain drivers and
# fractional trainer workers: the run then hangs without an error.
TASK_CPUS = 0.25


def quiet() -> None:
    """No per-dataset progress bars or execution banners: the engine prints one line per
    generation, and Ray Data's console output would drown it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logger = logging.getLogger("ray.data")
    if logger.getEffectiveLevel() < logging.WARNING:  # quieter already (collapse run): keep
        logger.setLevel(logging.WARNING)

# Rows per Parquet file when Ray Data writes a corpus. The writer gathers this many
# rows in one task before it writes, so it bounds that task's memory: 20,000 stories
# of ~250 tokens are ~40 MB of token ids (200,000 made the largest process grow with
# the corpus: bench/scale_memory.py), and a paper-size corpus is ~100 files.
ROWS_PER_FILE = 20_000
