"""Real text for the language-model family: loaders, the study-fixed split, tokens.

Sources:
- `grammar` — the embedded story grammar (engine/families/lm/grammar.py), with each
  story's exact log-probability;
- a TinyStories text file in its published format (paragraph lines, each story ended
  by a line `<|endoftext|>`);
- Parquet or JSON(L) with a `text` column (the Hugging Face layout);
- a directory of such files (read in name order);
from a local path or any URI fsspec can open (s3://, gs://, hf://, file://).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.files import list_source_files, open_source

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".parquet", ".json", ".jsonl")


class DataError(ValueError):
    """A data source problem, phrased for the user (names the file)."""


def _list_files(source: str) -> list[str]:
    suffixes = TEXT_SUFFIXES + TABLE_SUFFIXES
    try:
        files = list_source_files(source, suffixes)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    if not files:
        raise DataError(f"{source}: no .txt, .parquet, .json or .jsonl files in this directory")
    return files


def _stories_from_text(f, limit: int | None) -> list[str]:
    stories, paragraphs = [], []
    for raw in io.TextIOWrapper(f, encoding="utf-8"):
        line = raw.strip()
        if line == END_OF_TEXT:
            if paragraphs:
                stories.append("\n".join(paragraphs))
                paragraphs = []
                if limit is not None and len(stories) >= limit:
                    break
        elif line:
            paragraphs.append(line)
    if paragraphs and (limit is None or len(stories) < limit):
        stories.append("\n".join(paragraphs))  # a last story without its end marker
    return stories


def _stories_from_table(uri: str, f) -> list[str]:
    if uri.endswith(".parquet"):
        table = pq.read_table(f, columns=None)
        if "text" not in table.column_names:
            raise DataError(f"{uri}: no `text` column (columns: {', '.join(table.column_names)})")
        return [t for t in table.column("text").to_pylist() if t]
    data = f.read().decode("utf-8")
    try:
        rows = json.loads(data) if uri.endswith(".json") and data.lstrip().startswith("[") else \
            [json.loads(line) for line in data.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if rows and not all(isinstance(r, dict) and "text" in r for r in rows):
        raise DataError(f"{uri}: every record needs a `text` field")
    return [r["text"] for r in rows if r["text"]]


def read_stories(source: str, max_stories: int | None = None) -> list[str]:
    """Stories from a file, directory or URI; the first `max_stories` of them."""
    stories: list[str] = []
    for uri in _list_files(source):
        remaining = None if max_stories is None else max_stories - len(stories)
        if remaining == 0:
            break
        try:
            with open_source(uri) as f:
                if uri.endswith(TEXT_SUFFIXES):
                    got = _stories_from_text(f, remaining)
                elif uri.endswith(TABLE_SUFFIXES):
                    got = _stories_from_table(uri, f)
                else:
                    raise DataError(f"{uri}: unknown format (expected {', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)})")
        except (OSError, UnicodeDecodeError, pa.ArrowInvalid) as e:
            raise DataError(f"{uri}: unreadable ({e})") from None
        stories.extend(got if remaining is None else got[:remaining])
    if not stories:
        raise DataError(f"{source}: no stories found (empty corpus)")
    return stories


def split(n: int, test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split of n items: (train indices, test indices)."""
    if test >= n:
        raise DataError(f"the corpus has {n} stories, not enough for {test} held-out test "
                        "stories plus training data")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[test:]), np.sort(order[:test])
