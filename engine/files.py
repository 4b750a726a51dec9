"""Where a run's files live, and writing them so that a reader sees a whole file or none.

A run directory (a study's `out`) is a path — on this machine's disk, or on a filesystem
mounted at the same place on every node (NFS, EFS, Filestore) — or an object-store URI
(s3://bucket/run, gs://bucket/run) that every node reaches. The engine reads and writes
under it only through a `Location`; for object stores a Location holds a pyarrow
filesystem (credentials and endpoint from the environment, as for the AWS and Google
command-line tools: AWS_ENDPOINT_URL, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS...).

Whole or nothing:
- a file on a POSIX filesystem is written under a temporary name in its directory and
  renamed into place; a kill -9 at any moment leaves at most a stray temp file, which the
  next write of the same name replaces;
- an object store has no rename, but an object only exists once its upload is complete
  (a multipart upload is committed when the stream closes), so a file is uploaded there
  from a finished local temp file;
- a directory (a saved model) is renamed into place on a POSIX filesystem; in an object
  store its files are uploaded and then a COMPLETE marker, and only the marker makes the
  directory count as written (`directory_complete`).

Readers that need a real local directory (transformers, vLLM, torch.load) ask for
`local_copy`: the path itself when the run is on a filesystem, else a node-local copy
kept in a cache keyed by the marker, so each node downloads a model once.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable
from engine.errors import CollapseError, NotFound

TEMP_PREFIX = ".tmp-"
CHECKSUMS = "CHECKSUMS.json"  # one hash per file of a directory written whole
COMPLETE = "COMPLETE"  # the marker that makes an object-store directory count as written
# The object stores a run directory may live in (pyarrow has a filesystem for each).
OBJECT_STORES = {"s3": "s3", "gs": "gs", "gcs": "gs"}


class StorageError(CollapseError, ValueError):
    pass


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


# An OSError that says where a file cannot go, not what went wrong in the engine.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
              errno.ENOTDIR, errno.EEXIST)


def _why(e: OSError) -> str:
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a directory would go"
    return e.strerror


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


def lock_owner() -> dict[str, Any]:
    """Who holds a lock: this host, this process and when the process started (a pid
    alone may be reused by a later process)."""
    import socket

    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time()}


def owner_gone(path: Path) -> bool:
    """Whether the lock's maker is known dead: it ran on this host and its process is
    gone. A maker on another host (a shared filesystem) is judged by the lock's age."""
    import socket

    import psutil

    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # being written this instant, or gone: look again
    if owner.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(owner["pid"]).create_time() != owner["started"]
    except psutil.NoSuchProcess:
        return True
    except (KeyError, TypeError, psutil.Error):
        return False


def made_once(done: Callable[[], bool], make: Callable[[], None], lock: Location,
              stale_after: float = 120.0, poll: float = 1.0) -> bool:
    """Make something once among processes that may want it at the same time (chains of
    a study on one shared filesystem): the first to create `lock` makes it, the others
    wait until `done()`. The lock names its maker; a maker killed on this host (a chain
    stopped with kill -9 and resumed) is seen at once, one on another host by the lock
    going untouched for `stale_after` seconds (the maker touches it while it works).
    Returns whether this process made it. Filesystems only: an object store has no
    atomic create."""
    import threading
    import time

    path = lock.local_path
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        if done():
            return False
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if (owner_gone(path)
                        or time.time() - path.stat().st_mtime > stale_after):
                    path.unlink()  # its maker is gone
                    continue
            except FileNotFoundError:
                continue
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(lock_owner(), f)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(stale_after / 4):
                try:
                    os.utime(path)
                except FileNotFoundError:
                    return

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            if done():
                return False
            make()
            return True
        finally:
            stop.set()
            beat.join()
            path.unlink(missing_ok=True)


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
