"""Atomic writes: a reader (or a resumed run) sees a whole file or none of it.

Every file the engine writes goes to a temporary name in the same directory first and
is renamed into place; a kill -9 at any moment leaves at most a stray temp file, which
the next write of the same name replaces.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

TEMP_PREFIX = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) and rename tmp to final."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(final: Path, value: Any) -> None:
    write_atomic(final, lambda tmp: tmp.write_text(json.dumps(value, indent=1, sort_keys=True)))


def write_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temp directory and rename it to final, which must not exist yet."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        fill(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
