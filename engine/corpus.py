"""The corpus store: one Parquet shard set per source, one manifest.

    <chain>/corpus/manifest.json
    <chain>/corpus/real-0001/part-00000.parquet      real chunk 1
    <chain>/corpus/synthetic-0003/part-00000.parquet  sampled by the generation-3 model

Every shard carries a `_row` column (the row's index within its source) so a mix's row
selection is exact however Ray Data splits or reorders the files. A manifest entry
(rows, per-file SHA-256, the model that made it, temperature) is written only after its
files are in place, and both are written atomically: a source is in the store whole or
not at all. The store counts rows; it never looks at what a row means.

Every shard is checked against its manifest checksum before a mix reads it (once per
shard and process): a file changed or cut short after it was written stops the chain
with one line naming it. Deleting a corpus's directory is how a user asks for it to be
made again (the chain samples it again from its model, with the same seeds).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.files import Location, write_atomic, write_json
from engine.strategies import Mix, Source

if TYPE_CHECKING:
    import ray.data

ROW = "_row"
ROWS_PER_FILE = 1_000_000
# (file URI, SHA-256) pairs this process has already checked: each shard is hashed once
# per process, not once per generation that reads it.
_VERIFIED: set[tuple[str, str]] = set()


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the store's root
    rows: int
    sha256: str


@dataclass(frozen=True)
class ManifestEntry:
    source: str
    kind: str
    index: int
    rows: int
    files: tuple[ShardFile, ...]
    model: str  # what made these rows: "real data" or the sampling model
    temperature: float | None
    written: float  # unix time
    stats: dict[str, float] = field(default_factory=dict)  # the family's sample statistics
    metadata: dict[str, str] = field(default_factory=dict)  # the table's schema metadata


def _sha256(where: Location) -> str:
    h = hashlib.sha256()
    with where.fs.open_input_stream(where.fs_path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_floating(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def _write_parquet(table: pa.Table, path: Path) -> None:
    # Dictionary encoding never pays on continuous floats (sampled labels, points) and
    # trying it doubled the write time; ids and text keep it. LZ4: fast, and still
    # shrinks token ids.
    dictionary = [f.name for f in table.schema if not _is_floating(f.type)]
    pq.write_table(table, path, compression="lz4", use_dictionary=dictionary,
                   write_statistics=False)


@dataclass(frozen=True)
class Selection:
    """Which rows of each source a mix takes: row indices, repeats allowed, sorted."""

    source: Source
    rows: np.ndarray


class CorpusStore:
    def __init__(self, root: Location | Path | str):
        self.root = Location.of(root)  # a path or an object-store URI (engine/files.py)
        self.manifest_path = self.root / "manifest.json"

    # ------------------------------------------------------------------ manifest
    def entries(self) -> dict[str, ManifestEntry]:
        if not self.manifest_path.exists():
            return {}
        try:
            raw = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise CorpusError(f"{self.manifest_path}: unreadable manifest ({e}); the shards "
                              "beside it are intact — restore the file or delete the "
                              "chain's directory to recompute it") from None
        return {name: ManifestEntry(**{**e, "files": tuple(ShardFile(**f) for f in e["files"])})
                for name, e in raw.items()}

    def has(self, source: Source) -> bool:
        """Whether the store holds the corpus: its manifest entry, and its files (a
        corpus whose directory was deleted is one the user wants made again)."""
        entry = self.entries().get(source.name)
        return entry is not None and (self.root / entry.files[0].path).exists()

    def entry(self, source: Source) -> ManifestEntry:
        try:
            return self.entries()[source.name]
        except KeyError:
            raise CorpusError(f"{self.manifest_path}: no corpus {source.name} "
                              "(it has not been written yet)") from None

    # --------------------------------------------------------------------- write
    def write(self, source: Source, table: pa.Table, *, model: str,
              temperature: float | None = None,
              stats: dict[str, float] | None = None) -> ManifestEntry:
        entries = self.entries()
        if self.has(source):
            # Never overwrite a corpus a later generation may already have trained on.
            raise CorpusError(f"{self.manifest_path}: corpus {source.name} already exists")
        if table.num_rows == 0:
            raise CorpusError(f"refusing to store an empty corpus as {source.name}")
        table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        files = []
        for i, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
            part = table.slice(start, ROWS_PER_FILE)
            rel = f"{source.name}/part-{i:05d}.parquet"
            write_atomic(self.root / rel, lambda tmp: _write_parquet(part, tmp))
            files.append(ShardFile(rel, part.num_rows, _sha256(self.root / rel)))
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        entry = ManifestEntry(source.name, source.kind, source.index, table.num_rows,
                              tuple(files), model, temperature, time.time(), dict(stats or {}),
                              metadata)
        entries[source.name] = entry
        write_json(self.manifest_path, {k: asdict(v) for k, v in entries.items()})
        return entry

    # ---------------------------------------------------------------- selection
    def select(self, mix: Mix, seed: int) -> list[Selection]:
        """Resolve a mix into exact row indices per source (deterministic in seed)."""
        entries = self.entries()
        for part in mix.parts:
            have = entries[part.source.name].rows if part.source.name in entries else 0
            if have < part.rows:
                raise CorpusError(f"{self.manifest_path}: the mix needs {part.rows} rows of "
                                  f"{part.source.name}, the store has {have}")
        if mix.draw == "all":
            return [Selection(p.source, np.arange(p.rows)) for p in mix.parts]
        rng = np.random.default_rng(seed)
        drawn = rng.choice(mix.pool_rows, size=mix.rows, replace=mix.draw == "with_replacement")
        drawn.sort()
        offsets = np.cumsum([0] + [p.rows for p in mix.parts])
        return [Selection(p.source, drawn[(drawn >= lo) & (drawn < hi)] - lo)
                for p, lo, hi in zip(mix.parts, offsets[:-1], offsets[1:])]

    def _paths(self, source: Source) -> list[Location]:
        return [self.root / f.path for f in self.entry(source).files]

    def _verified_paths(self, source: Source) -> list[Location]:
        """The corpus's shard files, each checked against its manifest checksum (once
        per process); CorpusError in one line naming the file and the fix if not."""
        paths = []
        for f in self.entry(source).files:
            where = self.root / f.path
            if (where.uri, f.sha256) not in _VERIFIED:
                again = (f"delete {self.root / source.name} to have the chain "
                         + ("write it again from the study's real data" if source.kind == "real"
                            else f"sample it again from generation {source.index}'s model, "
                                 "with the same seeds"))
                if not where.exists():
                    raise CorpusError(f"{where}: missing, but the manifest lists it; {again}")
                if _sha256(where) != f.sha256:
                    raise CorpusError(f"{where}: checksum mismatch (the file changed after it "
                                      f"was written); {again}")
                _VERIFIED.add((where.uri, f.sha256))
            paths.append(where)
        return paths

    # ---------------------------------------------------------------- two views
    def _common_columns(self, selections: list[Selection]) -> list[str]:
        """A mix holds the columns every part has (real and sampled corpora differ in
        their provenance columns, e.g. true_logprob vs logprob)."""
        schemas = [pq.read_schema(p.path, filesystem=p.arrow()[0])
                   for sel in selections for p in self._verified_paths(sel.source)[:1]]
        return [n for n in schemas[0].names if n != ROW and all(n in s.names for s in schemas)]

    def read(self, mix: Mix, seed: int) -> pa.Table:
        """The mix in memory, for families that fit on a whole table."""
        selections = self.select(mix, seed)
        columns = self._common_columns(selections)
        tables = []
        for sel in selections:
            table = pa.concat_tables([_read(p, columns) for p in self._verified_paths(sel.source)])
            tables.append(table.take(pa.array(sel.rows)))
        return pa.concat_tables(tables)

    def head(self, source: Source, n: int) -> pa.Table:
        """The first n rows of one stored corpus (or fewer, if it holds fewer)."""
        return _read(self._paths(source)[0]).slice(0, n)

    def dataset(self, mix: Mix, seed: int) -> "ray.data.Dataset":
        """The same rows as read(), as a Ray Dataset streamed from the shards."""
        import ray.data

        from engine import raydata

        raydata.quiet()
        selections = self.select(mix, seed)
        columns = self._common_columns(selections)
        parts = []
        for sel in selections:
            # partitioning=None: chain directories are named like `replace__seed=0`,
            # which Ray Data would otherwise read as a Hive partition column.
            paths = self._verified_paths(sel.source)
            ds = ray.data.read_parquet([p.path for p in paths], filesystem=paths[0].arrow()[0],
                                       partitioning=None, num_cpus=raydata.TASK_CPUS
                                       ).select_columns(columns + [ROW])
            counts = np.bincount(sel.rows, minlength=self.entry(sel.source).rows)
            if not (counts == 1).all():
                ds = ds.map_batches(_KeepRows(counts), batch_format="pyarrow",
                                    num_cpus=raydata.TASK_CPUS)
            parts.append(ds)
        mixed = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        return mixed.drop_columns([ROW])

    # ------------------------------------------------------------------ checks
    def verify(self) -> list[str]:
        """Problems found re-reading every shard: missing files, checksum or row
        mismatches. Empty means the store is exactly what its manifest says."""
        problems = []
        for entry in self.entries().values():
            for f in entry.files:
                path = self.root / f.path
                if not path.exists():
                    problems.append(f"{path}: missing")
                elif _sha256(path) != f.sha256:
                    problems.append(f"{path}: checksum mismatch")
                elif pq.read_metadata(path.path, filesystem=path.arrow()[0]).num_rows != f.rows:
                    problems.append(f"{path}: row count mismatch")
        return problems


def _read(where: Location, columns: list[str] | None = None) -> pa.Table:
    # partitioning=None: chain directories are named like `replace__seed=0`, which
    # pyarrow would otherwise read as a Hive partition.
    fs, path = where.arrow()
    return pq.read_table(path, columns=columns, partitioning=None, filesystem=fs)


class _KeepRows:
    """Ray Data batch function: keep each row `counts[_row]` times."""

    def __init__(self, counts: np.ndarray):
        self.counts = counts

    def __call__(self, batch: pa.Table) -> pa.Table:
        repeat = self.counts[batch.column(ROW).to_numpy()]
        return batch.take(pa.array(np.repeat(np.arange(batch.num_rows), repeat)))
