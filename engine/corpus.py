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
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 — pa.compute
import pyarrow.parquet as pq

from engine.errors import CollapseError
from engine.files import TEMP_PREFIX, Location, lock_owner, owner_gone, write_atomic, write_json
from engine.strategies import Mix, Source

if TYPE_CHECKING:
    import ray.data

ROW = "_row"
WEIGHT = "_weight"  # a weighted mix's per-row loss weight (strategies.Mix.row_weights)
ROWS_PER_FILE = 1_000_000
# (file URI, SHA-256) pairs this process has already checked: each shard is hashed once
# per process, not once per generation that reads it.
_VERIFIED: set[tuple[str, str]] = set()


class CorpusError(CollapseError, RuntimeError):
    pass


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the root of the store that holds it
    rows: int
    sha256: str
    first_row: int = 0  # the smallest and largest `_row` in the file
    last_row: int = -1
    # sums of the file's integer count columns (`n_tokens`): what a fit's step count
    # needs, without reading the file (CorpusStore.mix_size)
    sums: dict[str, int] = field(default_factory=dict)


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
    # A linked source: its rows are the rows offset..offset+rows-1 (by `_row`) of
    # files kept in another store, `base` (the study's prepared real data): every chain
    # reads them there instead of holding a copy.
    base: str | None = None
    offset: int = 0


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


# Count columns whose per-file sums the manifest keeps (a language model's tokens).
SUMMED = ("n_tokens",)


def _shard(where: Location, rel: str) -> ShardFile:
    """A written shard's manifest record: rows, checksum, the range of its `_row`s."""
    fs, path = where.arrow()
    counted = [c for c in SUMMED if c in pq.read_schema(path, filesystem=fs).names]
    table = pq.read_table(path, columns=[ROW] + counted, partitioning=None, filesystem=fs)
    rows = table.column(ROW)
    sums = {c: int(pa.compute.sum(table.column(c)).as_py() or 0) for c in counted}
    if len(rows) == 0:
        return ShardFile(rel, 0, _sha256(where), 0, -1, sums)
    return ShardFile(rel, len(rows), _sha256(where), int(pa.compute.min(rows).as_py()),
                     int(pa.compute.max(rows).as_py()), sums)


def write_table_into(table: pa.Table, directory: Location) -> None:
    """A table's rows as corpus shards in `directory`, numbered by `_row` in table order
    (what CorpusStore.write_streamed takes in; each file written whole or not at all)."""
    table = table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    for i, start in enumerate(range(0, max(table.num_rows, 1), ROWS_PER_FILE)):
        part = table.slice(start, ROWS_PER_FILE)
        write_atomic(directory / f"part-{i:05d}.parquet", lambda tmp: _write_parquet(part, tmp))


@dataclass(frozen=True)
class Selection:
    """Which rows of each source a mix takes: row indices, repeats allowed, sorted."""

    source: Source
    rows: np.ndarray


@dataclass(frozen=True)
class StoredRows:
    """Rows offset..offset+rows-1 of a source in another store: what a family's real
    data hands the chain instead of a table when its rows live on storage (the LM's
    prepared training split), so that no process holds them."""

    store: str  # the store's root (a path or URI)
    source: Source
    offset: int
    rows: int

    @property
    def num_rows(self) -> int:  # as a pyarrow Table has
        return self.rows


class CorpusStore:
    def __init__(self, root: Location | Path | str):
        self.root = Location.of(root)  # a path or an object-store URI (engine/files/)
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
        return entry is not None and (not entry.files or
                                      self._location(entry, entry.files[0]).exists())

    def entry(self, source: Source) -> ManifestEntry:
        try:
            return self.entries()[source.name]
        except KeyError:
            raise CorpusError(f"{self.manifest_path}: no corpus {source.name} "
                              "(it has not been written yet)") from None

    def _location(self, entry: ManifestEntry, f: ShardFile) -> Location:
        return (Location.of(entry.base) if entry.base else self.root) / f.path

    def _add(self, entry: ManifestEntry) -> ManifestEntry:
        entries = self.entries()
        entries[entry.source] = entry
        write_json(self.manifest_path, {k: asdict(v) for k, v in entries.items()})
        return entry

    def _refuse_existing(self, source: Source) -> None:
        if self.has(source):
            # Never overwrite a corpus a later generation may already have trained on.
            raise CorpusError(f"{self.manifest_path}: corpus {source.name} already exists")

    # --------------------------------------------------------------------- write
    def write(self, source: Source, table: pa.Table, *, model: str,
              temperature: float | None = None,
              stats: dict[str, float] | None = None) -> ManifestEntry:
        """Store an in-memory table as the corpus `source` (small corpora: the exact
        families' labels, images)."""
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        return self.write_streamed(
            source, lambda d: (write_table_into(table, d), (dict(stats or {}), metadata))[1],
            model=model, temperature=temperature)

    def write_streamed(self, source: Source,
                       fill: Callable[[Location], tuple[dict[str, float], dict[str, str]]],
                       *, model: str, temperature: float | None = None) -> ManifestEntry:
        """Store a corpus that `fill(directory)` writes as Parquet files straight into
        `directory` (each row with its `_row`, e.g. from Ray Data's writer), without the
        corpus passing through this process. `fill` returns the corpus's statistics and
        metadata. The files are checksummed and the manifest entry written after they
        are all in place: until then the corpus is not in the store, and a corpus cut
        short by a kill is written again from scratch."""
        self._refuse_existing(source)
        final = self.root / source.name
        final.remove()  # what a killed attempt left
        for stale in self.root.children():
            # Another writer's, only once it is known dead: a live one may still be
            # writing there (two runs into one out are refused: engine/run.py)
            if stale.name.startswith(TEMP_PREFIX) and stale.name.endswith(f"-{source.name}") \
                    and (not stale.is_local or _maker_gone(stale)):
                stale.remove()
        # A filesystem: fill a temp directory and rename it into place; an object store
        # has no rename, and files without a manifest entry do not count.
        target = (self.root / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{source.name}"
                  if final.is_local else final)
        target.mkdir()
        if final.is_local:
            (target.local_path / MAKER).write_text(json.dumps(lock_owner()))
        try:
            stats, metadata = fill(target)
            if final.is_local:
                (target.local_path / MAKER).unlink()
                os.replace(target.local_path, final.local_path)
        finally:
            if final.is_local:
                target.remove()
        names = sorted(f.name for f in final.children() if f.name.endswith(".parquet"))
        files = tuple(_shard(final / n, f"{source.name}/{n}") for n in names)
        rows = sum(f.rows for f in files)
        if rows == 0:
            raise CorpusError(f"refusing to store an empty corpus as {source.name}")
        covered = sorted((f.first_row, f.last_row) for f in files if f.rows)
        if covered[0][0] != 0 or covered[-1][1] != rows - 1:
            raise CorpusError(f"{final}: its `{ROW}` values do not number its {rows} rows "
                              "0..n-1")
        return self._add(ManifestEntry(source.name, source.kind, source.index, rows, files,
                                       model, temperature, time.time(), dict(stats),
                                       dict(metadata)))

    def link(self, source: Source, rows: StoredRows, *, model: str = "real data"
             ) -> ManifestEntry:
        """Make `source` rows.offset.. of a source in another store, read in place. An
        earlier link of `source` is replaced (a link holds no rows of its own, so nothing
        is lost): the corpus it pointed at was deleted to be made again, and made."""
        existing = self.entries().get(source.name)
        if existing is None or not existing.base:
            self._refuse_existing(source)
        other = CorpusStore(rows.store)
        entry = other.entry(rows.source)
        if rows.offset + rows.rows > entry.rows:
            raise CorpusError(f"{other.manifest_path}: {rows.source.name} has {entry.rows} "
                              f"rows, not {rows.offset + rows.rows}")
        last = rows.offset + rows.rows - 1
        files = tuple(f for f in entry.files
                      if f.rows and f.first_row <= last and f.last_row >= rows.offset)
        base = (Location.of(entry.base) if entry.base else other.root).uri
        whole = rows.offset == 0 and rows.rows == entry.rows  # the same corpus, shared
        return self._add(ManifestEntry(
            source.name, source.kind, source.index, rows.rows, files,
            entry.model if whole else model, entry.temperature if whole else None,
            time.time(), dict(entry.stats) if whole else {}, dict(entry.metadata),
            base=base, offset=entry.offset + rows.offset))

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

    def _verified_paths(self, source: Source) -> list[Location]:
        """The corpus's shard files, each checked against its manifest checksum (once
        per process); CorpusError in one line naming the file and the fix if not."""
        entry = self.entry(source)
        paths = []
        for f in entry.files:
            where = self._location(entry, f)
            if (where.uri, f.sha256) not in _VERIFIED:
                if entry.base and source.kind == "synthetic":
                    again = (f"delete {Location.of(entry.base) / source.name} (generation "
                             "1's corpus, shared by the study's chains) to have it sampled "
                             "again from generation 1's model, with the same seeds")
                elif entry.base:
                    again = (f"delete {Location.of(entry.base)} (the study's prepared real "
                             "data) to have it prepared again")
                else:
                    again = (f"delete {self.root / source.name} to have the chain "
                             + ("write it again from the study's real data"
                                if source.kind == "real" else
                                f"sample it again from generation {source.index}'s model, "
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
        """The mix in memory, for families that fit on a whole table; a weighted mix
        (a workflow's `weights`) carries each row's loss weight in the column WEIGHT."""
        selections = self.select(mix, seed)
        columns = self._common_columns(selections)
        table = pa.concat_tables([self._rows(sel.source, columns).take(pa.array(sel.rows))
                                  for sel in selections])
        rows_of: dict[str, int] = {}
        for sel in selections:
            rows_of[sel.source.kind] = rows_of.get(sel.source.kind, 0) + len(sel.rows)
        per_row = mix.row_weights(rows_of)
        if per_row is None:
            return table
        return table.append_column(WEIGHT, pa.array(np.concatenate(
            [np.full(len(sel.rows), per_row[sel.source.kind]) for sel in selections])))

    def _rows(self, source: Source, columns: list[str]) -> pa.Table:
        """One corpus in memory, its rows in the order of their `_row` (shards written
        by parallel writers hold them in any order; a linked source's files hold other
        rows too)."""
        entry = self.entry(source)
        table = pa.concat_tables([_read(p, columns + [ROW])
                                  for p in self._verified_paths(source)])
        local = table.column(ROW).to_numpy() - entry.offset
        keep = (local >= 0) & (local < entry.rows)
        if not keep.all():
            table, local = table.filter(pa.array(keep)), local[keep]
        if len(local) != entry.rows:
            raise CorpusError(f"{self.manifest_path}: {source.name} should hold {entry.rows} "
                              f"rows, its files hold {len(local)}")
        position = np.empty(entry.rows, dtype=np.int64)
        position[local] = np.arange(entry.rows)
        return table.take(pa.array(position)).drop_columns([ROW])

    def table(self, source: Source, columns: list[str] | None = None) -> pa.Table:
        """One whole corpus in memory, in row order: for small ones only (a test split)."""
        if columns is None:
            entry = self.entry(source)
            first = self._location(entry, entry.files[0])
            columns = [n for n in pq.read_schema(first.path, filesystem=first.arrow()[0]).names
                       if n != ROW]
        return self._rows(source, columns)

    def scan(self, source: Source, columns: list[str]):
        """A corpus file by file, each table with its `_row` (the row's index in the
        corpus): for reading a part of a large corpus without holding all of it."""
        entry = self.entry(source)
        for where in self._verified_paths(source):
            table = _read(where, columns + [ROW])
            local = pa.compute.subtract(table.column(ROW), entry.offset)
            yield table.set_column(table.schema.get_field_index(ROW), ROW, local)

    def head(self, source: Source, n: int) -> pa.Table:
        """The first n rows of one stored corpus (or fewer, if it holds fewer)."""
        entry = self.entry(source)
        first = min(entry.files, key=lambda f: f.first_row)
        table = _read(self._location(entry, first))
        rows = table.column(ROW).to_numpy() - entry.offset
        order = np.argsort(rows, kind="stable")
        order = order[(rows[order] >= 0) & (rows[order] < entry.rows)][:n]
        return table.take(pa.array(order)).drop_columns([ROW])

    def source_dataset(self, source: Source, columns: list[str]) -> "ray.data.Dataset":
        """One whole source's shards (those columns and `_row`) as a Ray Dataset, for a
        pass over a corpus where its data is (statistics), not through this process."""
        from engine import raydata

        raydata.quiet()
        paths = self._verified_paths(source)
        return raydata.read_parquet_files([p.path for p in paths], paths[0].arrow()[0],
                                          columns + [ROW])

    def dataset(self, mix: Mix, seed: int, shuffle_files: bool = False,
                weight_unit: str | None = None) -> "ray.data.Dataset":
        """The same rows as read(), as a Ray Dataset streamed from the shards, a block
        per file (a weighted mix's rows with their WEIGHT; see _kind_weights for
        `weight_unit`). `shuffle_files`: the files of every part in one order drawn from
        `seed` (each file its block), so that a reader streaming the blocks meets the
        parts' rows mixed from its first batch, without an all-to-all pass (Ray Data's
        randomize_block_order waits for every block of the mix before it yields one)."""
        from engine import raydata

        raydata.quiet()
        selections = self.select(mix, seed)
        columns = self._common_columns(selections)
        weights = self._kind_weights(mix, selections, weight_unit)
        files, keeps = [], []
        for k, sel in enumerate(selections):
            paths = self._verified_paths(sel.source)
            entry = self.entry(sel.source)
            keeps.append(_part_filter(np.bincount(sel.rows, minlength=entry.rows),
                                      sum(f.rows for f in entry.files), entry.offset,
                                      _weight_of(weights, sel.source.kind)))
            files += [(p.path, k) for p in paths]
        if shuffle_files:
            order = np.random.default_rng(seed).permutation(len(files))
            files = [files[i] for i in order]
        # partitioning=None inside: chain directories are named like `replace__seed=0`,
        # which Ray Data would otherwise read as a Hive partition column.
        first = self._verified_paths(selections[0].source)[0]
        ds = raydata.read_parquet_files(
            [f for f, _ in files], first.arrow()[0], columns + [ROW],
            parts=[k for _, k in files], keep=keeps).drop_columns(
            [ROW], num_cpus=raydata.CHAIN_TASK_CPUS)
        if shuffle_files:  # the drawn order is the order read, whichever read ends first
            ds.context.execution_options.preserve_order = True
        return raydata.bounded(ds)

    def stream(self, mix: Mix, seed: int, weight_unit: str | None = None) -> "MixStream":
        """The same rows as read(), for a reader in this process that takes them file by
        file (a fit in the chain's own process): no process holds the mix. A weighted
        mix's rows carry their WEIGHT (see _kind_weights for `weight_unit`)."""
        selections = self.select(mix, seed)
        weights = self._kind_weights(mix, selections, weight_unit)
        files = []
        for sel in selections:
            entry = self.entry(sel.source)
            keep = _part_filter(np.bincount(sel.rows, minlength=entry.rows),
                                sum(f.rows for f in entry.files), entry.offset,
                                _weight_of(weights, sel.source.kind))
            files += [(where, keep) for where in self._verified_paths(sel.source)]
        return MixStream(tuple(files), tuple(self._common_columns(selections)))

    def _kind_weights(self, mix: Mix, selections: list[Selection],
                      unit: str | None) -> dict[str, float] | None:
        """A weighted mix's per-row loss weight of each kind (Mix.row_weights), None for
        an unweighted one. `unit`: the count column a row's loss is a mean over (the
        language models' `n_tokens`: their loss is a mean over tokens, so a kind's share
        is its tokens' share), None: rows."""
        if mix.weights is None:
            return None
        sizes: dict[str, int] = {}
        for sel in selections:
            size = len(sel.rows) if unit is None else self._selection_sum(sel, unit)
            sizes[sel.source.kind] = sizes.get(sel.source.kind, 0) + size
        return mix.row_weights(sizes)

    def mix_size(self, mix: Mix, seed: int, column: str) -> tuple[int, int]:
        """(the sum of `column` over the mix's rows, its rows), from the manifest where
        a part takes whole files whose sums it records, else from that column of the
        files alone, file by file: a count before a fit that reads neither the mix nor
        the rest of its columns."""
        selections = self.select(mix, seed)
        return (sum(self._selection_sum(sel, column) for sel in selections),
                sum(len(sel.rows) for sel in selections))

    def _selection_sum(self, sel: Selection, column: str) -> int:
        """The sum of `column` over one part's selected rows (see mix_size)."""
        entry = self.entry(sel.source)
        counts = np.bincount(sel.rows, minlength=entry.rows)
        total = 0
        for f, where in zip(entry.files, self._verified_paths(sel.source)):
            first, last = f.first_row - entry.offset, f.last_row - entry.offset
            inside = first >= 0 and last < entry.rows
            if inside and f.sums.get(column) is not None and \
                    (counts[first:last + 1] == 1).all() and f.rows == last - first + 1:
                total += f.sums[column]
                continue
            table = _read(where, [column, ROW])
            local = table.column(ROW).to_numpy() - entry.offset
            keep = (local >= 0) & (local < entry.rows)
            values = table.column(column).to_numpy()[keep]
            total += int((values * counts[local[keep]]).sum())
        return total

    # ------------------------------------------------------------------ checks
    def verify(self) -> list[str]:
        """Problems found re-reading every shard: missing files, checksum or row
        mismatches. Empty means the store is exactly what its manifest says."""
        problems = []
        for entry in self.entries().values():
            for f in entry.files:
                path = self._location(entry, f)
                if not path.exists():
                    problems.append(f"{path}: missing")
                elif _sha256(path) != f.sha256:
                    problems.append(f"{path}: checksum mismatch")
                elif pq.read_metadata(path.path, filesystem=path.arrow()[0]).num_rows != f.rows:
                    problems.append(f"{path}: row count mismatch")
        return problems


MAKER = ".maker"  # in a temp directory being filled: who fills it (engine/files/writes.py)


def _maker_gone(directory: Location) -> bool:
    """Whether the process filling a temp directory is known dead (or named none)."""
    maker = directory.local_path / MAKER
    return not maker.exists() or owner_gone(maker)


def rows_written(directory: Location) -> int:
    """Rows in the Parquet files a writer has finished in `directory` so far (their
    footers; a file still being written has none yet and counts nothing): how far a
    streamed write got (engine/progress.py)."""
    rows = 0
    for f in directory.children():
        if not f.name.endswith(".parquet"):
            continue
        fs, path = f.arrow()
        try:
            rows += pq.read_metadata(path, filesystem=fs).num_rows
        except (OSError, pa.ArrowInvalid):
            continue
    return rows


def _read(where: Location, columns: list[str] | None = None) -> pa.Table:
    # partitioning=None: chain directories are named like `replace__seed=0`, which
    # pyarrow would otherwise read as a Hive partition.
    fs, path = where.arrow()
    return pq.read_table(path, columns=columns, partitioning=None, filesystem=fs)


class _KeepRows:
    """Ray Data batch function: keep each row `counts[_row - offset]` times (rows outside
    the source, in a linked source's shared files, none; counts None: every row once),
    and with `weight`, give every row that loss weight (the column WEIGHT)."""

    def __init__(self, counts: np.ndarray | None, offset: int = 0, weight: float | None = None):
        self.counts, self.offset, self.weight = counts, offset, weight

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.counts is not None:
            local = batch.column(ROW).to_numpy() - self.offset
            inside = (local >= 0) & (local < len(self.counts))
            repeat = np.zeros(len(local), dtype=np.int64)
            repeat[inside] = self.counts[local[inside]]
            batch = batch.take(pa.array(np.repeat(np.arange(batch.num_rows), repeat)))
        if self.weight is None:
            return batch
        return batch.append_column(WEIGHT, pa.array(np.full(batch.num_rows, self.weight,
                                                            dtype=np.float32)))


def _weight_of(weights: dict[str, float] | None, kind: str) -> float | None:
    """A kind's per-row weight in a weighted mix (0 for a kind with no rows in it, which
    dropped out of Mix.row_weights), None for an unweighted mix."""
    return None if weights is None else weights.get(kind, 0.0)


def _part_filter(counts: np.ndarray, stored_rows: int, offset: int,
                 weight: float | None) -> "_KeepRows | None":
    """What a part's files pass through: nothing where the part takes each of its
    source's stored rows once and is unweighted, else a _KeepRows."""
    whole = (counts == 1).all() and stored_rows == len(counts)
    if whole and weight is None:
        return None
    return _KeepRows(None if whole else counts, offset, weight)


@dataclass(frozen=True)
class MixStream:
    """A training mix as its verified files, each with the filter its part's rows pass
    (CorpusStore.stream): read one file at a time, in an order a seed draws."""

    files: tuple  # (Location, _KeepRows or None)
    columns: tuple[str, ...]

    def tables(self, columns: list[str], seed: int):
        """The mix's rows as tables of one file each, the files in an order drawn from
        `seed`."""
        for i in np.random.default_rng(seed).permutation(len(self.files)):
            where, keep = self.files[i]
            table = _read(where, list(columns) + [ROW])
            yield (keep(table) if keep is not None else table).drop_columns([ROW])


@dataclass(frozen=True)
class CorpusView:
    """One stored corpus as a family's measures after sampling read it (Family.compare):
    streamed as a Ray Dataset, or its first rows in memory, never its files."""

    store: CorpusStore
    source: Source

    def dataset(self, columns: list[str]) -> "ray.data.Dataset":
        return self.store.source_dataset(self.source, columns)

    def head(self, n: int) -> pa.Table:
        """The first n rows (fewer if its first shard holds fewer)."""
        return self.store.head(self.source, n)
