"""Whole or nothing: a file or a directory written under a temporary name and put in
place, or uploaded and then marked complete (see the package doc)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

from engine.files.location import UNWRITABLE, Location, StorageError, _why

TEMP_PREFIX = ".tmp-"
CHECKSUMS = "CHECKSUMS.json"  # one hash per file of a directory written whole
COMPLETE = "COMPLETE"  # the marker that makes an object-store directory count as written


def check_writable(where: Location) -> None:
    """Write and delete a probe file under `where`, or say in one line why not. Leaves
    nothing behind: directories the probe had to make are removed again."""
    probe = where / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    made = None
    if where.is_local:  # the outermost directory the probe will create, if any
        missing = where.local_path.absolute()
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        made = None if missing.exists() else missing
    try:
        try:
            write_atomic(probe, lambda tmp: tmp.write_bytes(b""))
        except StorageError as e:  # names the probe; the user should see `where`
            reason = str(e).rsplit("(", 1)[-1].rstrip(")")
            raise OSError(reason) from None
        probe.remove()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    except OSError as e:
        reason = " ".join(str(e).split())  # pyarrow's messages run over several lines
        raise StorageError(f"{where}: cannot write there ({reason}); check that it exists "
                           "and that this machine's credentials may write to it") from None


def temp_path(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: Location | Path | str, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a local temporary file and put it in place as `final`.
    A place that cannot be written (read-only, no permission, full) is one line."""
    final = Location.of(final)
    if final.is_local:
        target = final.local_path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            tmp.touch()
        except OSError as e:
            if e.errno not in UNWRITABLE:
                raise
            raise StorageError(f"{final}: cannot be written ({_why(e)})") from None
        try:
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="collapse-upload-") as d:
        tmp = Path(d) / final.name
        write(tmp)
        final.upload(tmp)


def write_json(final: Location | Path | str, value: Any) -> None:
    write_atomic(final, lambda tmp: tmp.write_text(json.dumps(value, indent=1, sort_keys=True)))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """CHECKSUMS.json in a local directory being filled: a hash of every other file."""
    sums = {str(f.relative_to(directory)): _file_digest(f)
            for f in sorted(directory.rglob("*")) if f.is_file() and f.name != CHECKSUMS}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))


def write_directory(final: Location | Path | str, fill: Callable[[Path], None]) -> None:
    """Fill a local temp directory and put it in place as `final`, which must not be
    complete yet (see the module doc for what makes it complete)."""
    final = Location.of(final)
    if final.is_local:
        target = final.local_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(target)
        tmp.mkdir()
        try:
            fill(tmp)
            write_checksums(tmp)  # verified when read (engine/records.py)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return
    final.remove()  # what an upload cut short left behind
    with tempfile.TemporaryDirectory(prefix="collapse-upload-") as d:
        fill(Path(d))
        write_checksums(Path(d))
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                (final / str(f.relative_to(d))).upload(f)
    # Its content names this version of the directory, for node-local caches.
    write_atomic(final / COMPLETE, lambda tmp: tmp.write_text(uuid.uuid4().hex))


def directory_complete(where: Location | Path | str) -> bool:
    where = Location.of(where)
    if where.is_local:
        return where.local_path.is_dir()
    return (where / COMPLETE).is_file()
