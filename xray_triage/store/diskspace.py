"""Free disk space and the storage's degraded state, shared by the gateway and the health check.

The gateway must never acknowledge an image it cannot keep, and should not fill
the disk to the last byte either (SQLite then cannot even commit the row of an
image already written). So a C-STORE is refused with 0xA700 (out of resources,
PS3.4 B.2.3) while the data directory's file system has less than
``min_free_disk_mb`` free after the incoming file, or while start-up could not
finish its database writes (the server then runs *degraded* and retries them).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MB = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass
class StorageGuard:
    """Says whether storing ``n`` more bytes is allowed now; thread-safe.

    ``free`` is injectable (tests); ``degraded`` holds why start-up storage work
    failed, until the recovery loop clears it.
    """

    data_dir: Path
    min_free_mb: float
    free: Callable[[Path], int] = free_bytes
    _degraded: str | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def set_degraded(self, reason: str) -> None:
        with self._lock:
            self._degraded = reason

    def clear_degraded(self) -> None:
        with self._lock:
            self._degraded = None

    @property
    def degraded(self) -> str | None:
        with self._lock:
            return self._degraded

    def free_mb(self) -> float:
        return round(self.free(self.data_dir) / MB, 1)

    def refusal(self, incoming_bytes: int = 0) -> str | None:
        """Why ``incoming_bytes`` more must not be stored now (0xA700), or None."""
        degraded = self.degraded
        if degraded:
            return f"storage degraded: {degraded}"
        free = self.free(self.data_dir)
        if free - incoming_bytes < self.min_free_mb * MB:
            return f"disk nearly full: {free // MB} MB free, {self.min_free_mb:g} MB kept free"
        return None

    def report(self) -> dict[str, object]:
        """For /healthz: ``storage`` is ``ok`` or ``degraded``, with the free space in MB."""
        try:
            free_mb: float | None = self.free_mb()
        except OSError:
            free_mb = None
        degraded = self.degraded
        low = free_mb is None or free_mb < self.min_free_mb
        body: dict[str, object] = {
            "storage": "degraded" if degraded or low else "ok",
            "disk_free_mb": free_mb,
            "min_free_disk_mb": self.min_free_mb,
        }
        if degraded:
            body["storage_problem"] = degraded
        elif low:
            body["storage_problem"] = "free disk space under min_free_disk_mb"
        return body
