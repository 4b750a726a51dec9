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

The package, by job: `uris` (the URI parser and study sources), `location` (Location),
`writes` (whole-or-nothing files and directories), `locks` (work done once among
racing processes), `cache` (local copies of stored directories). Its names are
imported from here.
"""
from engine.files.cache import copy_directory, local_copy, node_cache
from engine.files.location import UNWRITABLE, Location, StorageError
from engine.files.locks import lock_owner, made_once, owner_gone
from engine.files.uris import (OBJECT_STORES, is_remote, list_source_files, open_source,
                               source_size, split_uri)
from engine.files.writes import (CHECKSUMS, COMPLETE, TEMP_PREFIX, _file_digest,
                                 check_writable, directory_complete, temp_path, write_atomic,
                                 write_checksums, write_directory, write_json)

__all__ = ["CHECKSUMS", "COMPLETE", "OBJECT_STORES", "TEMP_PREFIX", "UNWRITABLE", "Location",
           "StorageError", "_file_digest", "check_writable", "copy_directory",
           "directory_complete", "is_remote", "list_source_files", "local_copy",
           "lock_owner", "made_once", "node_cache", "open_source", "owner_gone",
           "source_size", "split_uri", "temp_path", "write_atomic", "write_checksums",
           "write_directory", "write_json"]
