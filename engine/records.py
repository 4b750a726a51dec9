"""Files a later step or the table trusts, each written with its checksum and verified
when read, as corpus shards are (engine/corpus.py): a generation's metrics, a chain's
trial record, a model directory, the results table.

A JSON record carries `sha256`, the hash of its own canonical JSON without that key.
A directory written whole carries CHECKSUMS.json, one hash per file. The results table
has `results.parquet.sha256` beside it. A file that fails its check (edited, cut
short, a flipped bit) is `DamagedFile`, named in one line; the chain recomputes it
where its inputs are intact (engine/chain.py), the table is rebuilt from the chains'
verified metrics (engine/results).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine.errors import CollapseError
from engine.files import CHECKSUMS, Location, _file_digest, write_atomic


class DamagedFile(CollapseError):
    """A trusted file that is not what was written (its path and what is wrong)."""


def _digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def write_record(final: Location | Path | str, value: dict[str, Any]) -> None:
    """A JSON record with its checksum, written whole or not at all."""
    body = {k: v for k, v in value.items() if k != "sha256"}
    text = json.dumps({**body, "sha256": _digest(body)}, indent=1, sort_keys=True)
    write_atomic(final, lambda tmp: tmp.write_text(text))


def read_record(where: Location | Path | str) -> dict[str, Any]:
    """A record write_record wrote, verified: DamagedFile naming it if it is not."""
    where = Location.of(where)
    try:
        value = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{where}: unreadable ({e})") from None
    if not isinstance(value, dict) or "sha256" not in value:
        raise DamagedFile(f"{where}: no checksum (not written by this engine, or cut short)")
    body = {k: v for k, v in value.items() if k != "sha256"}
    if _digest(body) != value["sha256"]:
        raise DamagedFile(f"{where}: checksum mismatch (the file changed after it was "
                          "written)")
    return body


def intact_record(where: Location | Path | str) -> dict[str, Any] | None:
    """The verified record, or None where it is missing or damaged."""
    where = Location.of(where)
    if not where.exists():
        return None
    try:
        return read_record(where)
    except DamagedFile:
        return None


# ------------------------------------------------------------------ directories

def directory_problem(where: Location | Path | str) -> str | None:
    """What is wrong with a directory written with its checksums, or None: a file
    missing, changed, or CHECKSUMS.json itself missing or unreadable."""
    from engine.files import local_copy

    where = Location.of(where)
    local = local_copy(where) if not where.is_local else where.local_path
    listed = local / CHECKSUMS
    if not listed.is_file():
        return f"{where}: no {CHECKSUMS} (written by an older engine, or cut short)"
    try:
        sums = json.loads(listed.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{where / CHECKSUMS}: unreadable"
    for name, digest in sums.items():
        f = local / name
        if not f.is_file():
            return f"{where / name}: missing"
        if _file_digest(f) != digest:
            return f"{where / name}: checksum mismatch (the file changed after it was written)"
    return None


# ------------------------------------------------------------------ a table file

def write_file_checksum(path: Location) -> None:
    """`path.sha256` beside a file: its hash."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    write_atomic(Location.of(f"{path.uri}.sha256"), lambda tmp: tmp.write_text(digest))


def file_problem(path: Location) -> str | None:
    """What is wrong with a file checked by its `.sha256` sidecar, or None."""
    sidecar = Location.of(f"{path.uri}.sha256")
    if not sidecar.exists():
        return f"{path}: no checksum beside it ({sidecar.name})"
    if hashlib.sha256(path.read_bytes()).hexdigest() != sidecar.read_text().strip():
        return f"{path}: checksum mismatch (the file changed after it was written)"
    return None


def read_runs(where: Location) -> list[dict[str, Any]]:
    """runs.json, each `collapse run` of an out: a list of mappings, or DamagedFile
    naming it (it records past runs only: deleting it loses nothing else)."""
    if not where.exists():
        return []
    try:
        runs = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        runs, why = None, str(e)
    else:
        why = "not a list of runs"
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise DamagedFile(f"{where}: unreadable ({why}); delete it (it only records past "
                          "runs)")
    return runs
