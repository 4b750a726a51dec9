"""`Location`: a path or an object-store URI under a run, read and written the same way."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

from engine.errors import CollapseError, NotFound
from engine.files.uris import OBJECT_STORES, split_uri


class StorageError(CollapseError, ValueError):
    pass


# An OSError that says where a file cannot go, not what went wrong in the engine.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
              errno.ENOTDIR, errno.EEXIST)


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a directory would go"
    return e.strerror


class Location:
    """A file or directory of a run: `path` on this machine's filesystem (scheme ""), or
    `path` ("bucket/key") inside an object store's pyarrow filesystem."""

    def __init__(self, path: str, scheme: str = "", fs: Any = None):
        self.path, self.scheme, self._fs = path, scheme, fs

    @staticmethod
    def of(where: "Location | Path | str") -> "Location":
        """A path, a file:// URI, or an s3:// / gs:// URI; anything else is refused."""
        if isinstance(where, Location):
            return where
        where = str(where)
        scheme, rest = split_uri(where)
        if not scheme:
            return Location(rest)
        if scheme not in OBJECT_STORES:
            raise StorageError(f"{where}: unsupported scheme {scheme}:// (supported: a path, "
                               "file://, s3://, gs://)")
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(f"{OBJECT_STORES[scheme]}://{rest}")
        return Location(path.rstrip("/"), OBJECT_STORES[scheme], fs)

    # ------------------------------------------------------------------ naming
    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> "Location":
        if self.is_local:
            return Location(str(Path(self.path) / name))
        return Location(f"{self.path}/{name}", self.scheme, self._fs)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        if self.is_local:
            return Location(str(Path(self.path).parent))
        return Location(self.path.rsplit("/", 1)[0], self.scheme, self._fs)

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise StorageError(f"{self.uri} is in an object store, not on this machine")
        return Path(self.path)

    # --------------------------------------------------------------- pyarrow
    @property
    def fs(self):
        """The pyarrow filesystem (LocalFileSystem for paths)."""
        if self._fs is None:
            import pyarrow.fs as pafs

            self._fs = pafs.LocalFileSystem()
        return self._fs

    @property
    def fs_path(self) -> str:
        """The path inside `fs` (absolute for local paths, which pyarrow requires)."""
        return str(Path(self.path).resolve()) if self.is_local else self.path

    def arrow(self) -> tuple[Any, str]:
        """(filesystem, path) for pyarrow and Ray Data readers: (None, path) locally, so
        they infer it as they always have."""
        return (None, self.path) if self.is_local else (self.fs, self.path)

    def storage(self) -> dict[str, Any]:
        """`storage_path` (and `storage_filesystem`) for a Ray Train or Tune RunConfig."""
        if self.is_local:
            return {"storage_path": str(Path(self.path).resolve())}
        return {"storage_path": self.path, "storage_filesystem": self.fs}

    # ------------------------------------------------------------------ reading
    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.is_local:
            return Path(self.path).exists()
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        if self.is_local:
            return Path(self.path).is_file()
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        if self.is_local:
            return Path(self.path).read_bytes()
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{self.uri}: no such file") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self) -> list["Location"]:
        """What the directory holds, sorted by name (empty if it does not exist)."""
        if self.is_local:
            if not Path(self.path).is_dir():
                return []
            return [self / p.name for p in sorted(Path(self.path).iterdir())]
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [self / i.base_name for i in sorted(infos, key=lambda i: i.base_name)]

    # ------------------------------------------------------------------ changing
    def mkdir(self) -> None:
        """Make the directory (object stores have none to make)."""
        if self.is_local:
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if e.errno not in UNWRITABLE:
                    raise
                raise StorageError(f"{self}: cannot be made ({_why(e)})") from None

    def remove(self) -> None:
        """Delete the file or directory tree, if there is one."""
        if self.is_local:
            p = Path(self.path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
            return
        import pyarrow.fs as pafs

        kind = self._info().type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload(self, local: Path) -> None:
        """Copy a finished local file here (object stores: one complete upload)."""
        with open(local, "rb") as src, self.fs.open_output_stream(self.path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
