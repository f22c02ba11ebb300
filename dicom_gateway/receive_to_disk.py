"""C-STORE data sets are written to a file as they arrive, in the data directory's ``incoming/``.

pynetdicom holds a received data set in memory until the whole message has arrived, and
the handler then holds it again as a decoded data set and as encoded bytes: with eight
15 MB images arriving at once that was ~950 MB of RSS. With pynetdicom's
``_config.STORE_RECV_CHUNKED_DATASET`` (pynetdicom >= 2.0, documented in ``pynetdicom._config``)
each P-DATA fragment is appended to a temporary Part 10 file instead, and the C-STORE
handler gets its path (``event.dataset_path``); pynetdicom deletes the file after the
handler returns (it tolerates the file having been renamed away).

pynetdicom creates that file with ``tempfile.NamedTemporaryFile`` in the process's temp
directory. To store it with a rename (no copy), it must be on the data directory's file
system, so the factory pynetdicom calls is pointed at ``<data_dir>/incoming`` of the running
gateway (``rx-<random>.dcm``; a crash leaves them for the start-up clean-up). This is a
process-wide setting of pynetdicom, as the chunked mode itself is: ``enable`` is called by
each gateway as it starts and ``disable`` as it stops; while several gateways run in one
process (tests), files go to the newest one's directory and the ingest copies a file that
is on another file system.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

log = logging.getLogger(__name__)

PREFIX = "rx-"
_lock = threading.Lock()
_directories: list[Path] = []  # incoming/ of each running gateway, newest last
_original_factory = dimse_messages.NamedTemporaryFile


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, in ``incoming/``."""
    with _lock:
        directory = next((d for d in reversed(_directories) if d.is_dir()), None)
    if directory is not None and "dir" not in kwargs:
        kwargs = {**kwargs, "dir": directory, "prefix": PREFIX}
    return _original_factory(*args, **kwargs)


def enable(incoming: Path) -> None:
    """Receive C-STORE data sets to files in ``incoming`` (made if missing)."""
    incoming.mkdir(parents=True, exist_ok=True)
    with _lock:
        _directories.append(incoming)
        dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True


def disable(incoming: Path) -> None:
    """Undo ``enable(incoming)``; the last gateway to stop restores pynetdicom's defaults."""
    with _lock:
        if incoming in _directories:
            _directories.remove(incoming)
        if not _directories:
            dimse_messages.NamedTemporaryFile = _original_factory  # type: ignore[assignment]
            _config.STORE_RECV_CHUNKED_DATASET = False
