"""A study's real text, prepared once before any chain starts, streaming.

    pieces(source)                      byte ranges / row groups / grammar draws
      -> count stories per piece        (Ray tasks; the driver keeps one count per piece)
      -> the split                      test = the first `test_stories` of a seeded
                                        permutation of all N stories; train = the rest,
                                        in source order (exactly what data.split gives)
      -> tokenizer                      trained on at most TOKENIZER_SAMPLE training
                                        stories (a seeded sample), or the one given
      -> tokenize and write             Ray tasks per piece, each writing its stories'
                                        rows (text, ids, n_tokens, [true_logprob], _row)
                                        as Parquet: `train` and `test` corpora of a
                                        CorpusStore in the run's storage, checksummed

No process holds the stories: a task holds its piece, the driver the per-piece counts,
the test indices and the tokenizer's sample. Chains link their real chunks to the
`train` corpus (row ranges of it) instead of copying it. Each step is written whole or
not at all (tokenizer directory, corpus entries, `ready.json` last), so a killed
preparation is run again from where it stopped: steps already written are kept.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from engine.corpus import ROW, CorpusStore
from engine.families.lm.data import DataError, Piece, grammar_pieces, pieces, read_piece
from engine.files import Location, local_copy, write_directory, write_json
from engine.strategies import Source

log = logging.getLogger("engine.lm")

TRAIN, TEST = Source("train", 1), Source("test", 1)
TOKENIZER_SAMPLE = 100_000  # training stories the tokenizer learns from, at most
READY = "ready.json"


@dataclass(frozen=True)
class Prepared:
    """What preparation left in `directory`."""

    directory: Location
    stories: int
    train: int
    test: int
    vocab: int

    @property
    def store(self) -> CorpusStore:
        return CorpusStore(self.directory / "corpus")

    @property
    def tokenizer(self) -> Location:
        return self.directory / "tokenizer"


def read_prepared(directory: Location) -> Prepared | None:
    ready = directory / READY
    if not ready.exists():
        return None
    return Prepared(directory=directory, **json.loads(ready.read_text()))


def _count(row: dict[str, Any]) -> dict[str, Any]:
    """A piece's story count, or the one line saying what is wrong with its data: handed
    back, not raised, so that the driver raises it as itself (through Ray Data a task's
    error arrives as a multi-line wrapper of it)."""
    try:
        return {"piece": row["piece"], "count": len(read_piece(Piece(**row["spec"]))[0]),
                "problem": ""}
    except DataError as e:
        return {"piece": row["piece"], "count": 0, "problem": str(e)}


def _stories_of(spec: dict, first: int, n: int) -> tuple[list[str], list[float] | None]:
    """The first `n` stories of a piece whose first story has global index `first`."""
    texts, truth = read_piece(Piece(**spec))
    return texts[:n], None if truth is None else truth[:n]


class _Sample:
    """The tokenizer's sample: the texts of the chosen global story indices."""

    def __init__(self, chosen: np.ndarray):
        self.chosen = chosen

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        texts, _ = _stories_of(row["spec"], row["first"], row["n"])
        index = row["first"] + np.arange(len(texts))
        keep = np.isin(index, self.chosen)
        return {"first": row["first"], "texts": [t for t, k in zip(texts, keep) if k]}


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(uri: str):
    if uri not in _TOKENIZERS:  # once per worker process
        from engine.families.lm.tokenizer import load_tokenizer

        _TOKENIZERS[uri] = load_tokenizer(local_copy(uri))
    return _TOKENIZERS[uri]


def _rows(batch: dict[str, np.ndarray], split: str, test_index: np.ndarray,
          tokenizer: str) -> pa.Table:
    """Ray Data batch function: pieces' stories of one split, tokenized — Parquet rows
    with their `_row`, the story's index within its split (both splits in source order)."""
    tables = []
    for spec, first, n in zip(batch["spec"], batch["first"], batch["n"]):
        texts, truth = _stories_of(spec, int(first), int(n))
        index = int(first) + np.arange(len(texts))
        in_test = np.isin(index, test_index)
        keep = in_test if split == "test" else ~in_test
        # a story's index within its split: test stories before it, or train ones
        before = np.searchsorted(test_index, index)
        row = before if split == "test" else index - before
        picked = [t for t, k in zip(texts, keep) if k]
        ids = (_tokenizer(tokenizer)(picked, add_special_tokens=False)["input_ids"]
               if picked else [])
        columns = {"text": pa.array(picked, pa.string()),
                   "ids": pa.array(ids, pa.list_(pa.int32())),
                   "n_tokens": pa.array([len(i) for i in ids], pa.int64())}
        if truth is not None:
            columns["true_logprob"] = pa.array([t for t, k in zip(truth, keep) if k],
                                               pa.float64())
        columns[ROW] = pa.array(row[keep].astype(np.int64))
        tables.append(pa.table(columns))
    return pa.concat_tables(tables)


def prepare(p: Any, seed: int, directory: Location) -> Prepared:
    """Prepare the real data of the LM family's config `p` into `directory` (see the
    module doc); returns what was prepared. Needs a Ray connection (or starts one)."""
    import ray.data

    from engine import raydata

    done = read_prepared(directory)
    if done is not None:
        return done
    raydata.quiet()
    specs = (grammar_pieces(p.stories, seed) if p.data == "grammar" else pieces(p.data))
    # 1. stories per piece (grammar pieces know theirs)
    if p.data == "grammar":
        counts = np.array([s.end - s.start for s in specs])
    else:
        rows = [{"piece": i, "spec": s.__dict__} for i, s in enumerate(specs)]
        got = (ray.data.from_items(rows).map(_count, num_cpus=raydata.TASK_CPUS)
               .take_all())
        counts = np.zeros(len(specs), dtype=np.int64)
        for r in sorted(got, key=lambda r: r["piece"]):
            if r["problem"]:
                raise DataError(r["problem"])
            counts[r["piece"]] = r["count"]
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    n = total if p.max_stories is None else min(total, p.max_stories)
    if n == 0:
        raise DataError(f"{p.data}: no stories found (empty corpus)")
    if p.test_stories >= n:
        raise DataError(f"the corpus has {n} stories, not enough for {p.test_stories} held-out "
                        "test stories plus training data")
    # the pieces' first stories and how many of their stories count (max_stories)
    work = [{"spec": s.__dict__, "first": int(f), "n": int(min(c, max(0, n - f)))}
            for s, f, c in zip(specs, firsts, counts) if f < n]
    # 2. the split: data.split's, computed from the count alone
    test_index = np.sort(np.random.default_rng(seed).permutation(n)[:p.test_stories])
    # 3. the tokenizer
    tokenizer = directory / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        _make_tokenizer(p, seed, n, test_index, work, tokenizer)
    vocab = len(_tokenizer(tokenizer.uri))
    # 4. tokenize and write both splits, in parallel, straight into the store
    store = CorpusStore(directory / "corpus")
    for split, source in (("test", TEST), ("train", TRAIN)):
        if store.has(source):
            continue
        # Tasks, each a piece: every worker process loads the tokenizer once (_tokenizer).
        ds = ray.data.from_items(work).map_batches(
            _rows, fn_kwargs={"split": split, "test_index": test_index,
                              "tokenizer": tokenizer.uri},
            batch_size=1, batch_format="numpy", num_cpus=raydata.TASK_CPUS)

        def fill(target: Location, ds=ds) -> tuple[dict, dict]:
            fs, path = target.arrow()
            ds.write_parquet(path, filesystem=fs, num_rows_per_file=raydata.ROWS_PER_FILE,
                             ray_remote_args={"num_cpus": raydata.TASK_CPUS})
            return {}, {}

        store.write_streamed(source, fill, model="real data")
    prepared = Prepared(directory=directory, stories=n, train=n - p.test_stories,
                        test=p.test_stories, vocab=vocab)
    write_json(directory / READY, {"stories": prepared.stories, "train": prepared.train,
                                   "test": prepared.test, "vocab": prepared.vocab})
    log.info("real data: %d stories prepared (%d train, %d test), vocabulary %d",
             n, prepared.train, prepared.test, vocab)
    return prepared


def _make_tokenizer(p: Any, seed: int, n: int, test_index: np.ndarray, work: list,
                    where: Location) -> None:
    """Train byte-level BPE on (a seeded sample of at most TOKENIZER_SAMPLE of) the
    training stories, or copy the tokenizer the study names (or its pretrained model's)."""
    from engine.families.lm.tokenizer import load_tokenizer, train_tokenizer

    from engine.families.lm import pretrained

    if p.tokenizer is not None:
        tokenizer = load_tokenizer(local_copy(p.tokenizer))
    elif pretrained.is_pretrained(p.model):  # the checkpoint's own
        tokenizer = pretrained.tokenizer(p.model)
    else:
        import ray.data

        from engine import raydata

        if n - len(test_index) <= TOKENIZER_SAMPLE:  # every training story
            chosen = np.setdiff1d(np.arange(n), test_index)
        else:  # a seeded sample of training stories, drawn without listing them all
            rng = np.random.default_rng([seed, 1])
            draw = rng.choice(n, size=min(n, TOKENIZER_SAMPLE + len(test_index)),
                              replace=False)
            chosen = np.sort(draw[~np.isin(draw, test_index)][:TOKENIZER_SAMPLE])
        parts = (ray.data.from_items(work).map(_Sample(chosen), num_cpus=raydata.TASK_CPUS)
                 .take_all())
        # in source order, as the stories were read before (BPE's ties follow the order)
        texts = [t for part in sorted(parts, key=lambda r: r["first"]) for t in part["texts"]]
        tokenizer = train_tokenizer(texts, p.vocab_size)
    write_directory(where, lambda d: tokenizer.save_pretrained(d))
