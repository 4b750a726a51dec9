"""Real text for the language-model family: loaders, the study-fixed split, tokens.

Sources:
- `grammar` — the embedded story grammar (engine/families/lm/grammar.py), with each
  story's exact log-probability;
- a TinyStories text file in its published format (paragraph lines, each story ended
  by a line `<|endoftext|>`);
- Parquet or JSON(L) with a `text` column (the Hugging Face layout);
- a directory of such files (read in name order);
from a local path or any URI fsspec can open (s3://, gs://, hf://, file://).

`read_stories` reads a source whole (validation, dry runs, tests). Preparing a study's
real data reads it in `Piece`s instead — byte ranges of text and JSON-lines files, row
groups of Parquet files, chunks of grammar draws — each by its own Ray task, so that no
process holds the corpus (engine/families/lm/prepare.py). A story belongs to the piece
its first line starts in, so the pieces together read every story exactly once, in the
order `read_stories` gives.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import CollapseError
from engine.files import list_source_files, open_source, source_size

END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".parquet", ".json", ".jsonl")


class DataError(CollapseError, ValueError):
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


def _text_column(uri: str, table: pa.Table) -> list[str]:
    if "text" not in table.column_names:
        raise DataError(f"{uri}: no `text` column (columns: {', '.join(table.column_names)})")
    kind = table.schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{uri}: the `text` column holds {kind}, not strings")
    return [t for t in table.column("text").to_pylist() if t]


def story_text(uri: str, row: object, where: str) -> str:
    """One JSON record's `text`: a string, else DataError naming the file, the record
    (`where`: its line, or its place in a JSON list) and the field."""
    if not isinstance(row, dict) or "text" not in row:
        raise DataError(f"{uri}: {where}: no `text` field (every record needs one)")
    text = row["text"]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{uri}: {where}: `text` is {type(text).__name__} "
                        f"({str(text)[:40]}), not a string")
    return text or ""


def _stories_from_table(uri: str, f) -> list[str]:
    if uri.endswith(".parquet"):
        return _text_column(uri, pq.read_table(f, columns=None))
    data = f.read().decode("utf-8")
    if uri.endswith(".json") and data.lstrip().startswith("["):
        try:
            rows = json.loads(data)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno})") from None
        texts = [story_text(uri, r, f"record {k + 1}") for k, r in enumerate(rows)]
    else:
        texts = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{uri}: line {number}: not valid JSON ({e.msg})") from None
            texts.append(story_text(uri, row, f"line {number}"))
    return [t for t in texts if t]


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


# ----------------------------------------------------------------------- pieces

PIECE_BYTES = 64 << 20  # a text or JSON-lines piece: about this many bytes
GRAMMAR = "grammar"  # the `data:` value of the synthetic grammar source (grammar.py)
GRAMMAR_PIECE = 20_000  # a grammar piece: this many stories
_DELIMITER_LINE = re.compile(rb"\n[ \t\r]*<\|endoftext\|>[ \t\r]*(?:\n|$)")


@dataclass(frozen=True)
class Piece:
    """A part of a source one task reads: bytes start..end of a text or JSON-lines
    file, row group `start` of a Parquet file, a whole JSON file, or `end - start`
    grammar stories drawn with `seed`."""

    uri: str
    kind: str  # "text", "jsonl", "json", "parquet" or "grammar"
    start: int
    end: int
    seed: int = 0


def pieces(source: str, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """A file source's pieces, in the order read_stories reads its stories."""
    out = []
    for uri in _list_files(source):
        if uri.endswith(".parquet"):
            try:
                with open_source(uri) as f:
                    groups = pq.ParquetFile(f).metadata.num_row_groups
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{uri}: unreadable ({e})") from None
            out += [Piece(uri, "parquet", g, g + 1) for g in range(groups)]
        elif uri.endswith(".json"):
            out.append(Piece(uri, "json", 0, 0))
        else:
            size = source_size(uri)
            kind = "text" if uri.endswith(TEXT_SUFFIXES) else "jsonl"
            out += [Piece(uri, kind, a, min(size, a + piece_bytes))
                    for a in range(0, max(size, 1), piece_bytes)]
    return out


def grammar_pieces(stories: int, seed: int) -> list[Piece]:
    """Grammar draws in pieces of GRAMMAR_PIECE stories, each with its own seed (the
    first piece with the study's: a study of up to GRAMMAR_PIECE stories draws exactly
    what grammar.sample_stories(stories, seed) draws)."""
    from engine.seeds import derive_seed

    return [Piece("grammar", "grammar", a, min(stories, a + GRAMMAR_PIECE),
                  seed if a == 0 else derive_seed(seed, "grammar", a // GRAMMAR_PIECE))
            for a in range(0, stories, GRAMMAR_PIECE)]


def read_piece(piece: Piece) -> tuple[list[str], list[float] | None]:
    """The stories of one piece, in order, and (grammar) their exact log-probabilities."""
    if piece.kind == "grammar":
        from engine.families.lm import grammar

        drawn = grammar.sample_stories(piece.end - piece.start, piece.seed)
        return [s.text for s in drawn], [s.logprob for s in drawn]
    try:
        with open_source(piece.uri) as f:
            if piece.kind == "parquet":
                table = pq.ParquetFile(f).read_row_group(piece.start)
                return _text_column(piece.uri, table), None
            if piece.kind == "json":
                return _stories_from_table(piece.uri, f), None
            data, first = _lines_from(f, piece.start, piece.end, piece.kind == "text")
    except (OSError, UnicodeDecodeError, pa.ArrowInvalid) as e:
        raise DataError(f"{piece.uri}: unreadable ({e})") from None
    if piece.kind == "jsonl":
        return _jsonl_lines(piece.uri, data, first, piece.start, piece.end), None
    return _text_stories(data, first, piece.start, piece.end), None


def _lines_from(f, start: int, end: int, text: bool) -> tuple[bytes, int]:
    """Bytes from a little before `start` to past `end`: far enough for the last story
    (text) or line (JSON lines) that starts before `end` to end too. Returns them and
    the file offset they start at."""
    back = max(0, start - 256)  # enough to see the line before the piece's first
    f.seek(back)
    data = f.read(end - back)
    while True:  # read on until a delimiter line (text) or a newline starts at/after end
        tail_from = max(0, end - back - 1)
        done = (_DELIMITER_LINE.search(data, tail_from) if text
                else data.find(b"\n", tail_from) >= 0)
        more = f.read(1 << 20) if not done else b""
        if not more:
            return data, back
        data += more


def _first_line(data: bytes, back: int, start: int) -> int | None:
    """The file offset of the first line that starts at or after `start` (None: no line
    starts in the bytes read)."""
    if start == 0:
        return 0
    nl = data.find(b"\n", start - 1 - back)
    return None if nl < 0 else back + nl + 1


def _lines(data: bytes, back: int, first: int):
    """(offset, line) for each line from file offset `first` on."""
    pos = first - back
    while pos < len(data):
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl
        yield back + pos, data[pos:stop]
        pos = stop + 1


def _text_stories(data: bytes, back: int, start: int, end: int) -> list[str]:
    """The stories that start in [start, end): a story starts at the first line of the
    file or at the line after an `<|endoftext|>` line; empty stories are skipped, as
    read_stories skips them."""
    first = _first_line(data, back, start)
    if first is None or first >= end and start > 0:
        return []
    if first == 0:
        in_story = True
    else:  # does the line just before the piece's first line end a story?
        previous = data[:first - 1 - back].rsplit(b"\n", 1)
        whole = len(previous) == 2 or back == 0  # the line starts within the bytes read
        in_story = whole and previous[-1].strip() == END_OF_TEXT.encode()
    stories, paragraphs = [], []
    story_start = first if in_story else None
    for offset, raw in _lines(data, back, first):
        line = raw.decode("utf-8").strip()
        if not in_story:  # the rest of a story the previous piece owns
            if line == END_OF_TEXT:
                in_story, story_start = True, offset + len(raw) + 1
            continue
        if story_start >= end:
            return stories
        if line == END_OF_TEXT:
            if paragraphs:
                stories.append("\n".join(paragraphs))
                paragraphs = []
            story_start = offset + len(raw) + 1
        elif line:
            paragraphs.append(line)
    if paragraphs and in_story and story_start < end:
        stories.append("\n".join(paragraphs))  # a last story without its end marker
    return stories


def _jsonl_lines(uri: str, data: bytes, back: int, start: int, end: int) -> list[str]:
    """The `text` of each JSON line that starts in [start, end)."""
    first = _first_line(data, back, start)
    out = []
    if first is None:
        return out
    for offset, raw in _lines(data, back, first):
        if offset >= end:
            break
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}: line {_line_number(uri, offset)}: not valid JSON "
                            f"({e.msg})") from None
        try:
            text = story_text(uri, row, "")
        except DataError:
            story_text(uri, row, f"line {_line_number(uri, offset)}")  # the message, named
            raise
        if text:
            out.append(text)
    return out


def _line_number(uri: str, offset: int) -> int:
    """The line of a file that starts at byte `offset` (counted only for an error)."""
    with open_source(uri) as f:
        return f.read(offset).count(b"\n") + 1
