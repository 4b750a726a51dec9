"""Local copies of stored directories (a node's cache for object stores) and copying a
stored directory to another place."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from engine.files.location import Location
from engine.files.writes import (CHECKSUMS, COMPLETE, directory_complete, temp_path,
                                 write_directory)


def copy_directory(source: Location, final: Location) -> None:
    """`final` made a complete copy of the complete directory `source` (hard links on
    one filesystem: no bytes copied)."""
    here = local_copy(source)

    def fill(d: Path) -> None:
        for f in sorted(here.rglob("*")):
            if f.is_file() and f.name not in (COMPLETE, CHECKSUMS):
                target = d / f.relative_to(here)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)

    write_directory(final, fill)


def node_cache() -> Path:
    """This node's cache of object-store copies (COLLAPSE_CACHE, or the temp dir)."""
    return Path(os.environ.get("COLLAPSE_CACHE") or Path(tempfile.gettempdir()) / "collapse-cache")


def local_copy(where: Location | Path | str) -> Path:
    """A local directory holding what `where` holds: `where` itself on a filesystem; for
    an object store, a copy in this node's cache, downloaded once per written version."""
    where = Location.of(where)
    if where.is_local:
        return where.local_path
    version = (where / COMPLETE).read_text().strip() if directory_complete(where) else ""
    key = hashlib.sha256(f"{where.uri}#{version}".encode()).hexdigest()[:24]
    copy = node_cache() / "copies" / f"{key}-{where.name}"
    if copy.is_dir():
        return copy
    import pyarrow.fs as pafs

    copy.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(copy)
    try:
        for info in where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            local = tmp / info.path[len(where.path) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            with where.fs.open_input_stream(info.path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        try:
            os.replace(tmp, copy)
        except OSError:  # another process on this node put the same copy in place first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return copy
