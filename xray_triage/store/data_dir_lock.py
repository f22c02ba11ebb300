"""Which server processes are using a data directory: one advisory file lock (``flock``) each.

Several ``serve`` processes may share a data directory (process roles, shared storage). The
start-up clean-up of a crash's leftovers (``.part`` files, files renamed into place whose row
never committed) must not delete what another *live* process is writing or about to commit,
but should not leave a crashed single server's leftovers lying for an hour either. So each
process holds an exclusive ``flock`` on ``<data_dir>/.processes/<host>-<pid>.lock`` while it
runs; the kernel drops it when the process dies, however it dies (kill -9 included). A lock
file that can be locked by someone else belongs to a dead process and is removed.

``flock`` is honoured on local file systems and on NFSv4 (Linux maps it to byte-range locks);
the README's shared-storage notes say so.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

LOCK_DIR = ".processes"


class DataDirLock:
    """This process's lock on a data directory (``acquire`` once at start, kept until exit)."""

    def __init__(self, data_dir: Path, name: str | None = None) -> None:
        """``name``: the lock file's name (default ``<host>-<pid>``; tests give another)."""
        self.path = Path(data_dir) / LOCK_DIR / f"{name or f'{socket.gethostname()}-{os.getpid()}'}.lock"
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def other_processes_alive(data_dir: Path, own: DataDirLock | None = None) -> bool:
    """Whether another live process holds a lock on ``data_dir``; stale lock files are removed.
    ``own``: this process's lock (default: the one ``DataDirLock(data_dir)`` names)."""
    own_path = (own or DataDirLock(data_dir)).path
    alive = False
    for path in sorted((Path(data_dir) / LOCK_DIR).glob("*.lock")):
        if path == own_path:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            alive = True  # held by a live process
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # its process is gone
        finally:
            os.close(fd)
    return alive
