"""Ray Data settings the engine uses wherever it builds a Dataset."""
from __future__ import annotations

import logging
from typing import Any

# CPUs each Ray Data task of a study's preparation asks for (reading the real source,
# tokenizing, writing its shards; before any chain starts). At the default of 1 CPU they
# cannot be scheduled on a small machine whose CPUs are held by other work: the run
# then hangs without an error.
TASK_CPUS = 0.25

# CPUs of the Ray Data tasks and helper actors a chain starts and then waits on (the
# training mix's reads, the request rows, vLLM's pre/post-processing stages, writing a
# sampled corpus, its statistics): none of their own. They spend the CPU the chain's
# trial holds, whose driver sits idle meanwhile, as the chain's own task does
# (engine/sweep.py). Asking for more hangs a machine whose CPUs the chains, trainer
# workers and sampler actors hold: two quickstart chains sampling on 2 cores, each
# wanting 0.25 CPU for its writer with none free, waited forever.
CHAIN_TASK_CPUS = 0


def quiet() -> None:
    """No per-dataset progress bars or execution banners: the engine prints one line per
    generation, and Ray Data's console output would drown it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # ... and no warning that they are off (Ray Data configures its loggers on import)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logger = logging.getLogger("ray.data")
    if logger.getEffectiveLevel() < logging.WARNING:  # quieter already (collapse run): keep
        logger.setLevel(logging.WARNING)

# The most of the object store one chain's training stream holds at once (its blocks
# read ahead of the trainer workers): without a limit each Dataset may take half a node's
# object store, and eight chains streaming at once on one GPU node would spill.
# cluster.yaml sizes the object store from it.
CHAIN_STREAM_BYTES = 2 << 30


def bounded(ds):
    """The dataset, its object-store footprint held to CHAIN_STREAM_BYTES."""
    from ray.data._internal.execution.interfaces.execution_options import ExecutionResources

    ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=CHAIN_STREAM_BYTES)
    return ds


# Rows per Parquet file when Ray Data writes a corpus. The writer gathers this many
# rows in one task before it writes, so it bounds that task's memory: 20,000 stories
# of ~250 tokens are ~40 MB of token ids (200,000 made the largest process grow with
# the corpus: bench/scale_memory.py), and a paper-size corpus is ~100 files.
ROWS_PER_FILE = 20_000


class _ReadFile:
    """Ray Data batch function: one Parquet file's table, for a row naming the file,
    passed through its part's row filter where it has one."""

    def __init__(self, filesystem: Any, columns: list[str] | None, keep: list | None = None):
        self.filesystem, self.columns, self.keep = filesystem, columns, keep

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        parts = batch.column("part").to_pylist() if "part" in batch.column_names else None
        for i, path in enumerate(batch.column("path").to_pylist()):
            # partitioning=None: chain directories are named like `replace__seed=0`,
            # which pyarrow would otherwise read as a Hive partition.
            table = pq.read_table(path, columns=self.columns, partitioning=None,
                                  filesystem=self.filesystem)
            keep = self.keep[parts[i]] if parts is not None else None
            tables.append(keep(table) if keep is not None else table)
        return pa.concat_tables(tables)


def read_parquet_files(paths: list[str], filesystem: Any, columns: list[str] | None = None,
                       num_cpus: float = CHAIN_TASK_CPUS, parts: list[int] | None = None,
                       keep: list | None = None):
    """A lazy Dataset of these Parquet files, a block per file in the order given, read
    by map tasks of `num_cpus` CPUs; `parts[i]` names the filter of `keep` (a function
    of a table, or None) that file i's rows pass. Not ray.data.read_parquet: Ray 2.60
    lists the files first in a ListFiles task that asks for a whole CPU and ignores
    ray_remote_args, so where the chains, trainer workers and sampler actors hold all
    but a fraction of the CPUs (the quickstart on 2 cores: 1.2 held by chains) it never
    runs and the read hangs."""
    import ray.data

    rows = [{"path": p} if parts is None else {"path": p, "part": k}
            for p, k in zip(paths, parts or [None] * len(paths))]
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows))).map_batches(
        _ReadFile(filesystem, columns, keep), batch_size=1, batch_format="pyarrow",
        num_cpus=num_cpus)


def parquet_files_in(directory_path: str, filesystem: Any) -> list[str]:
    """The Parquet files directly in a directory, in name order."""
    from pyarrow import fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()  # Location.arrow(): None for local
    infos = filesystem.get_file_info(pafs.FileSelector(directory_path))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.path.endswith(".parquet"))


def read_tables(paths: list[str], filesystem: Any, columns: list[str] | None = None):
    """The same files as read_parquet_files, read one at a time in this process: for a
    pass over a few files where a Ray Data task's start would cost more than the read."""
    import pyarrow.parquet as pq

    for path in paths:
        yield pq.read_table(path, columns=columns, partitioning=None, filesystem=filesystem)
