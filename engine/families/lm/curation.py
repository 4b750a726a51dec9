"""Curation between sampling and storing: filters a study lists, in order, and top-ups.

    curate: [unfinished, duplicates, near_duplicates, perplexity, ungrammatical]

- `unfinished`: stories cut off at the length limit (no end-of-text token);
- `duplicates`: a story whose tokens equal an earlier story's (the first one stays);
- `near_duplicates`: a story whose token 3-grams resemble an earlier story's (MinHash,
  10 bands of 8 hashes: a pair with Jaccard similarity 0.8 is caught 84% of the time,
  0.5 rarely; the first story of each group stays);
- `perplexity`: a story whose perplexity under the sampling model falls outside
  `perplexity_band: [low, high]`: exp(-logprob / tokens), from the log-probability every
  story records as it is sampled (no second pass; the distribution it was drawn from);
- `ungrammatical`: for the grammar source, a story the grammar cannot produce (an exact
  verifier, engine/families/lm/grammar.py).

"Earlier" is request order (`_row`), so which story of a pair stays does not depend on
which sampler actor finished first, and neither does the corpus: it is the first n
stories, in request order, that no filter removes. Sampling goes on in rounds of fresh
requests (the next request numbers, so the next seeds) until n are kept.

Scale: the stories pass through Ray Data; what one process holds is a few numbers per
story (its request number, one flag per row filter, a hash, 10 band keys: ~100 bytes,
200 MB at 2M stories), read back from the staged files' small columns.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.corpus import ROW
from engine.families.lm.data import GRAMMAR
from engine.families.lm.metrics import _mix

FILTERS = ("unfinished", "duplicates", "near_duplicates", "perplexity", "ungrammatical")
ROW_FILTERS = ("unfinished", "perplexity", "ungrammatical")  # decided by the story alone
# The engine's own MinHash banding, not datasketch's MinHashLSH: a story's band keys are
# computed where the story is sampled (a Ray Data task) and only the keys travel (~100
# bytes a story), so "seen before" is decided in request order on keys alone, the same
# whichever sampler finished first; an LSH index object would have to live in one
# process and see the stories in the order they arrive.
BANDS, BAND_ROWS, SHINGLE = 10, 8, 3
# The request number a kept story had: its seed is derive_seed(sample seed, request).
REQUEST = "request"
MAX_ROUNDS = 8
MIN_KEEP_RATE = 0.02  # below it, stop and say so rather than sample 50x the corpus


@dataclass(frozen=True)
class Curation:
    filters: tuple[str, ...]  # in the order they are applied
    perplexity_band: tuple[float, float] | None = None
    # grammar data: every story is checked against the grammar, filtered or not, so
    # q(G) is measured over the model's own draws (metrics.reverse_kl_on_grammar)
    grammar: bool = False

    @property
    def flag_columns(self) -> list[str]:
        return ([f"drop_{f}" for f in self.filters if f in ROW_FILTERS]
                + (["grammatical"] if self.grammar else [])
                + (["exact_key"] if "duplicates" in self.filters else [])
                + (["band_keys"] if "near_duplicates" in self.filters else []))


def _band_seeds() -> np.ndarray:
    digest = hashlib.sha256(b"near-duplicate minhash").digest()
    return _mix(np.arange(BANDS * BAND_ROWS, dtype=np.uint64)
                + np.uint64(int.from_bytes(digest[:8], "little")))


def band_keys(ids: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """A story's BANDS MinHash band keys over its token 3-grams (a shorter story: itself)."""
    seeds = _band_seeds() if seeds is None else seeds
    tokens = np.asarray(ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        if len(tokens) >= SHINGLE:
            shingles = np.full(len(tokens) - SHINGLE + 1, np.uint64(SHINGLE))
            for k in range(SHINGLE):
                shingles = _mix(shingles ^ tokens[k:len(tokens) - SHINGLE + 1 + k])
        else:  # too short for one 3-gram: the whole story is its one shingle
            whole = np.uint64(len(tokens))
            for t in tokens:
                whole = _mix(whole ^ t)
            shingles = np.array([whole], dtype=np.uint64)
        signature = _mix(shingles[None, :] ^ seeds[:, None]).min(axis=1)
        bands = signature.reshape(BANDS, BAND_ROWS)
        keys = np.full(BANDS, np.uint64(BAND_ROWS))
        for r in range(BAND_ROWS):
            keys = _mix(keys ^ bands[:, r])
        # the band's number too: equal keys in different bands are no match
        return _mix(keys ^ np.arange(BANDS, dtype=np.uint64))


def exact_key(ids: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(),
                                          digest_size=8).digest(), "little")


def add_flags(batch: pa.Table, curation: Curation) -> pa.Table:
    """Ray Data batch function (after the sampler): each story's filter flags and keys."""
    columns = {}
    ids = batch.column("ids").to_pylist()
    for f in curation.filters:
        if f == "unfinished":
            columns["drop_unfinished"] = pa.array(
                ~batch.column("finished").to_numpy(zero_copy_only=False).astype(bool))
        elif f == "perplexity":
            low, high = curation.perplexity_band
            tokens = np.maximum(batch.column("n_tokens").to_numpy(), 1)
            ppl = np.exp(-batch.column("logprob").to_numpy() / tokens)
            columns["drop_perplexity"] = pa.array((ppl < low) | (ppl > high))
        elif f == "ungrammatical":
            columns["drop_ungrammatical"] = pa.array(~_grammatical(batch))
        elif f == "duplicates":
            columns["exact_key"] = pa.array([exact_key(i) for i in ids], pa.uint64())
        elif f == "near_duplicates":
            seeds = _band_seeds()
            columns["band_keys"] = pa.array([band_keys(np.asarray(i), seeds).tolist()
                                             for i in ids], pa.list_(pa.uint64(), BANDS))
    if curation.grammar:
        columns["grammatical"] = (pa.array(~columns["drop_ungrammatical"].to_numpy(
            zero_copy_only=False)) if "drop_ungrammatical" in columns
            else pa.array(_grammatical(batch)))
    for name, column in columns.items():
        batch = batch.append_column(name, column)
    return batch


def _grammatical(batch: pa.Table) -> np.ndarray:
    """As the `grammatical` metric counts: a story cut off at the length limit is not
    one the grammar ends."""
    from engine.families.lm import grammar

    return np.array([grammar.log_probability(t) is not None and f
                     for t, f in zip(batch.column("text").to_pylist(),
                                     batch.column("finished").to_pylist())], dtype=bool)


@dataclass(frozen=True)
class Kept:
    """What curation keeps of the stories sampled so far, and what each filter removed."""

    kept: np.ndarray  # the request numbers kept, ascending (at most n)
    considered: int  # requests looked at: up to and including the last one kept
    removed: dict[str, int]  # filter -> stories it removed among those considered
    grammatical: float | None = None  # grammar data: q(G) among those considered


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """For keys in request order: True where a key is seen for the first time."""
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return first


def select(flags: pa.Table, curation: Curation, n: int) -> Kept:
    """The first n stories in request order that no filter removes, from every staged
    story's flags (columns `_row` and Curation.flag_columns), filters in the study's order."""
    flags = flags.sort_by(ROW)
    rows = flags.column(ROW).to_numpy()
    alive = np.ones(len(rows), dtype=bool)
    removed_by = np.full(len(rows), -1)
    for i, f in enumerate(curation.filters):
        if f in ROW_FILTERS:
            drop = flags.column(f"drop_{f}").to_numpy(zero_copy_only=False).astype(bool)
        elif f == "duplicates":
            drop = np.zeros(len(rows), dtype=bool)
            keys = flags.column("exact_key").to_numpy()
            drop[alive] = ~_first_occurrences(keys[alive])
        else:  # near_duplicates: a band key met in an earlier story still alive
            drop = np.zeros(len(rows), dtype=bool)
            bands = (flags.column("band_keys").combine_chunks().flatten()
                     .to_numpy().reshape(-1, BANDS))[alive]
            near = np.zeros(len(bands), dtype=bool)
            for b in range(BANDS):
                near |= ~_first_occurrences(bands[:, b])
            drop[alive] = near
        drop &= alive
        removed_by[drop] = i
        alive &= ~drop
    kept = rows[alive][:n]
    considered = len(rows) if len(kept) < n else int(np.searchsorted(rows, kept[-1])) + 1
    counts = np.bincount(removed_by[:considered] + 1, minlength=len(curation.filters) + 1)
    grammatical = (float(flags.column("grammatical").to_numpy(zero_copy_only=False)
                         [:considered].mean()) if curation.grammar and considered else None)
    return Kept(kept, considered, {f: int(counts[i + 1])
                                   for i, f in enumerate(curation.filters)}, grammatical)


def next_round(short: int, kept_last: int, requested_last: int) -> int:
    """How many more requests to make for `short` more stories: at the keep rate of the
    last round (it falls as the corpus fills: a new story is likelier to duplicate one
    kept already), with a 20% margin; at least 64, at most 50x the shortfall."""
    rate = kept_last / max(1, requested_last)
    return max(64, math.ceil(short * 1.2 / max(rate, MIN_KEEP_RATE)))


def renumber(batch: pa.Table, kept: np.ndarray) -> pa.Table:
    """Ray Data batch function (the final pass): only the kept stories, their `_row`
    renumbered 0..n-1 in request order, the request number kept as `request`; flags gone."""
    import pyarrow.compute as pc

    rows = batch.column(ROW).to_numpy()
    index = np.searchsorted(kept, rows)
    hit = (index < len(kept)) & (kept[np.minimum(index, len(kept) - 1)] == rows)
    batch = batch.filter(pa.array(hit))
    keep = [c for c in batch.column_names if not (c.startswith("drop_") or c in
                                                  ("exact_key", "band_keys"))]
    batch = batch.select(keep)
    batch = batch.set_column(batch.column_names.index(ROW), ROW,
                             pa.array(index[hit].astype(np.int64)))
    return batch.append_column(REQUEST, pc.cast(pa.array(rows[hit]), pa.int64()))


def sample_curated(sampled, p, n: int, directory) -> tuple[str, dict[str, float]]:
    """Sample in rounds into a staging folder, each story flagged by the study's
    filters, until n stories pass them all; then write those n (the first in request
    order) into `directory`, renumbered. `sampled(count, start)`: a Ray Dataset of
    stories start..start+count-1 and the backend; `p`: the family's parameters.
    Returns the backend and what each filter removed."""
    import logging

    import pyarrow.parquet as pq

    from engine.families.lm.data import DataError

    log = logging.getLogger("engine.lm")
    from engine.raydata import (CHAIN_TASK_CPUS, ROWS_PER_FILE, parquet_files_in,
                                read_parquet_files)

    rules = Curation(tuple(p.curate), tuple(p.perplexity_band or ()) or None,
                     grammar=p.data == GRAMMAR)
    light = {"num_cpus": CHAIN_TASK_CPUS}
    staging = directory / "staged"
    flags, files, requested, count, kept = [], [], 0, n, 0
    for round_ in range(MAX_ROUNDS):
        ds, backend = sampled(count, requested)
        ds = ds.map_batches(add_flags, fn_kwargs={"curation": rules},
                            batch_format="pyarrow", num_cpus=CHAIN_TASK_CPUS)
        fs, path = (staging / f"round-{round_:02d}").arrow()
        ds.write_parquet(path, filesystem=fs, num_rows_per_file=ROWS_PER_FILE,
                         ray_remote_args=light)
        requested += count
        written = parquet_files_in(path, fs)
        files += written
        # only the small columns: a request number, flags and keys per story
        flags.append(pq.read_table(written, filesystem=fs,
                                   columns=["_row"] + rules.flag_columns))
        selection = select(pa.concat_tables(flags), rules, n)
        log.warning("sampler: curation round %d: %d stories kept of %d sampled "
                    "(removed: %s)", round_ + 1, len(selection.kept), requested,
                    ", ".join(f"{k} {v}" for k, v in selection.removed.items()))
        if len(selection.kept) == n:
            break
        if len(selection.kept) < MIN_KEEP_RATE * requested:
            raise DataError(f"family.curate: {len(selection.kept)} of {requested} sampled "
                            f"stories pass the filters (removed: {selection.removed}), "
                            f"fewer than {MIN_KEEP_RATE:.0%}: loosen the "
                            "filters (or the perplexity_band)")
        # the next round, at the keep rate of this one
        count = next_round(n - len(selection.kept), len(selection.kept) - kept,
                                    count)
        kept = len(selection.kept)
    else:
        raise DataError(f"family.curate: {MAX_ROUNDS} rounds of sampling kept "
                        f"{len(selection.kept)} of the {n} stories needed out of "
                        f"{requested} sampled (removed: {selection.removed}); loosen "
                        "the filters (or the perplexity_band)")
    fs, path = directory.arrow()
    read_parquet_files(files, fs).map_batches(
        renumber, fn_kwargs={"kept": selection.kept}, batch_format="pyarrow",
        num_cpus=CHAIN_TASK_CPUS).write_parquet(
        path, filesystem=fs, num_rows_per_file=ROWS_PER_FILE, ray_remote_args=light)
    staging.remove()
    return backend, {"curation_sampled": float(selection.considered),
                     **{f"curation_removed_{k}": float(v)
                        for k, v in selection.removed.items()},
                     **({} if selection.grammatical is None
                        else {"sampled_grammatical": selection.grammatical})}
