"""C-STORE data sets are written to a file as they arrive, in the data directory's ``incoming/``.

pynetdicom holds a received data set in memory until the whole message has arrived, and
the handler then held it again as a decoded data set and as encoded bytes: with eight
15 MB images arriving at once that was ~950 MB of RSS (issue 17). With pynetdicom's
``_config.STORE_RECV_CHUNKED_DATASET`` (pynetdicom >= 2.0, documented in ``pynetdicom._config``)
each P-DATA fragment is appended to a temporary Part 10 file instead, and the C-STORE
handler gets its path (``event.dataset_path``); pynetdicom deletes the file after the
handler returns (it tolerates the file having been renamed away).

pynetdicom creates that file with ``tempfile.NamedTemporaryFile`` in the process's temp
directory. To store it with a rename (no copy) it must be on the data directory's file
system, so the factory pynetdicom calls is replaced by :func:`_open_received`, which puts it
in ``<data_dir>/incoming`` of the running gateway (``rx-<random>.dcm``; a crash leaves them
for the start-up clean-up) and returns a :class:`ReceivedFile`:

* a failed write (a full disk) is remembered instead of raised, so pynetdicom keeps reading
  the message and the handler answers the C-STORE with 0xA700 (what the in-memory path
  answered) instead of pynetdicom aborting the association;
* files whose association ended before the handler took them (an abort mid-transfer) are
  removed by :func:`discard` (the gateway calls it on abort and close, and from its reaper).

This is a process-wide setting of pynetdicom, as the chunked mode itself is: ``enable`` is
called by each gateway as it starts and ``disable`` as it stops; while several gateways run
in one process (tests), files go to the newest one's directory and the ingest copies a file
that is on another file system.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from pathlib import Path

from pynetdicom import _config, dimse_messages

log = logging.getLogger(__name__)

PREFIX = "rx-"
_lock = threading.Lock()
_directories: list[Path] = []  # incoming/ of each running gateway, newest last
_open: dict[str, ReceivedFile] = {}  # by path: written by pynetdicom, not yet taken by a handler
_original_factory = dimse_messages.NamedTemporaryFile


class ReceivedFile:
    """The file pynetdicom writes one data set into (what ``NamedTemporaryFile`` gave it).

    pynetdicom uses ``name``, ``write``, ``file.flush()`` and ``close()``. ``error`` is the
    first OSError of a write, after which the rest of the message is read and dropped.
    ``owner``: the thread that receives the association's PDUs (pynetdicom's DUL reactor).
    """

    def __init__(self, directory: Path | None) -> None:
        self.owner = threading.current_thread()
        self.error: OSError | None = None
        self.file = self
        try:
            self._fp = _original_factory(delete=False, mode="wb", suffix=".dcm", prefix=PREFIX, dir=directory)
            self.name = self._fp.name
        except OSError as exc:  # no room even for an empty file, or incoming/ is gone
            self._fp = None
            self.name = str((directory or Path(tempfile.gettempdir())) / f"{PREFIX}unwritable.dcm")
            self.error = exc

    def write(self, data: bytes) -> int:
        if self.error is None and self._fp is not None:
            try:
                self._fp.write(data)
            except (OSError, ValueError) as exc:  # ValueError: closed by ``discard``
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None and self._fp is not None:
            try:
                self._fp.flush()
            except (OSError, ValueError) as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._fp is not None:
            with contextlib.suppress(OSError):  # a buffered write failed: already an error
                self._fp.close()

    def _fail(self, exc: OSError | ValueError) -> None:
        """Keep the first error and give the space back (the file is useless now)."""
        self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
        with contextlib.suppress(OSError):
            os.truncate(self.name, 0)
        log.error("cannot write a received data set", extra={"error": str(exc)})


def _open_received(*_args: object, **_kwargs: object) -> ReceivedFile:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, in ``incoming/``."""
    with _lock:
        directory = next((d for d in reversed(_directories) if d.is_dir()), None)
    received = ReceivedFile(directory)
    with _lock:
        _open[received.name] = received
    return received


def take(path: Path | str) -> OSError | None:
    """The C-STORE handler takes ``path`` over (``discard`` leaves it alone from now on);
    returns the write error that makes its content unusable, if any."""
    with _lock:
        received = _open.pop(str(path), None)
    return received.error if received is not None else None


def discard(owner: threading.Thread | None = None) -> int:
    """Remove files no handler took: those written by ``owner``'s association (its DUL
    reactor thread), or, with ``owner`` None, those whose association thread has ended.
    Returns how many were removed."""
    with _lock:
        gone = [name for name, received in _open.items() if _abandoned(received, owner)]
        dropped = [_open.pop(name) for name in gone]
    for received in dropped:
        received.error = received.error or OSError("the association ended before the data set was taken")
        received.close()
        with contextlib.suppress(OSError):  # never created, or pynetdicom removed it
            os.unlink(received.name)
    return len(dropped)


def _abandoned(received: ReceivedFile, owner: threading.Thread | None) -> bool:
    if owner is not None:
        return received.owner is owner
    return not received.owner.is_alive()


def enable(incoming: Path) -> None:
    """Receive C-STORE data sets to files in ``incoming`` (made if missing)."""
    incoming.mkdir(parents=True, exist_ok=True)
    with _lock:
        _directories.append(incoming)
        dimse_messages.NamedTemporaryFile = _open_received  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True


def disable(incoming: Path) -> None:
    """Undo ``enable(incoming)``; the last gateway to stop restores pynetdicom's defaults."""
    with _lock:
        if incoming in _directories:
            _directories.remove(incoming)
        if not _directories:
            dimse_messages.NamedTemporaryFile = _original_factory  # type: ignore[assignment]
            _config.STORE_RECV_CHUNKED_DATASET = False
