"""Work done once among processes that race for it: a lock file naming its owner
(host, process), taken over only when the owner is known dead."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from engine.files.location import Location


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
