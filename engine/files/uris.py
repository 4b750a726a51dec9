"""Object-store URIs (the one parser) and the sources a study reads: local paths or
any URI fsspec opens."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.errors import NotFound

# The object stores a run directory may live in (pyarrow has a filesystem for each).
OBJECT_STORES = {"s3": "s3", "gs": "gs", "gcs": "gs"}


# ------------------------------------------------------------------- the one URI parser

def split_uri(text: str) -> tuple[str, str]:
    """("s3", "bucket/key") for a URI; ("", path) for a plain path or a file:// URI.
    Every place that looks at a scheme asks here."""
    scheme, sep, rest = str(text).partition("://")
    if not sep or scheme == "file":
        return "", rest if sep else str(text)
    return scheme, rest


def is_remote(text: str) -> bool:
    """A URI another machine's filesystem serves (s3://, gs://, hf://...), not a path
    here: such data is checked when it is read, not when a study is validated."""
    return split_uri(text)[0] != ""


def _source_filesystem(uri: str) -> tuple[Any, str, str]:
    """(filesystem, path, kind) for a data URI: pyarrow's own filesystems first (s3://,
    gs://, hdfs:// — no extra packages), fsspec for the rest (hf://, memory://...)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path, "pyarrow"
    except (pa.ArrowInvalid, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path, "fsspec"


def open_source(source: str):
    """A binary stream of a data file given as a path or any URI (read-only data: study
    inputs, not run files)."""
    scheme, path = split_uri(source)
    if not scheme:
        return open(path, "rb")
    fs, inner, kind = _source_filesystem(source)
    return fs.open_input_file(inner) if kind == "pyarrow" else fs.open(inner, "rb")


def source_size(source: str) -> int:
    """The size in bytes of a data file given as a path or any URI."""
    scheme, path = split_uri(source)
    if not scheme:
        return os.path.getsize(path)
    fs, inner, kind = _source_filesystem(source)
    return fs.get_file_info(inner).size if kind == "pyarrow" else fs.size(inner)


def list_source_files(source: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files of a data source: itself if a file, else the files under it ending in
    one of `suffixes`, sorted. FileNotFoundError names the source if it does not exist."""
    scheme, local = split_uri(source)
    if not scheme:
        p = Path(local)
        if p.is_dir():
            return sorted(str(f) for f in p.rglob("*") if f.suffix in suffixes)
        if not p.exists():
            raise NotFound(f"{source}: no such file or directory")
        return [local]
    import pyarrow.fs as pafs

    fs, path, kind = _source_filesystem(source)
    if kind == "pyarrow":
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise NotFound(f"{source}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            return sorted(f"{scheme}://{f.path}" for f in found if f.path.endswith(suffixes))
        return [source]
    if not fs.exists(path):
        raise NotFound(f"{source}: no such file or directory")
    if fs.isdir(path):
        return [f"{scheme}://{p}" for p in sorted(fs.find(path)) if p.endswith(suffixes)]
    return [source]
