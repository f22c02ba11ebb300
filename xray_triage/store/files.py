"""Durable DICOM files under the data directory.

Layout (one file per SOP instance, easy to inspect with dcmdump)::

    <data_dir>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <data_dir>/quarantine/<SOPInstanceUID>/<random>.dcm   (kept apart: see ingest.py)
    <data_dir>/incoming/<random>.part        (only while a file is being written)
    <data_dir>/incoming/rx-<random>.dcm      (a C-STORE data set while it arrives)

A file is written to ``incoming/`` first, flushed and fsync'ed, then renamed
into place and its directory fsync'ed: a crash at any point leaves either no
file or a complete one, never a half-written ``.dcm``. The gateway receives each
data set straight into ``incoming/rx-*.dcm`` (``dicom_gateway/receive_to_disk.py``),
so storing it is an fsync and a rename, not a second copy.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

COPY_CHUNK = 1024 * 1024

# PS3.5 9.1: UIDs are digits and dots, at most 64 characters. Checking this also
# keeps a hostile UID such as "../../etc" out of the file system paths.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))


def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    for uid in (study_uid, series_uid, sop_uid):
        if not is_valid_uid(uid):
            raise ValueError(f"not a valid DICOM UID: {uid!r}")
    return Path("dicom") / study_uid / series_uid / f"{sop_uid}.dcm"


def quarantine_relpath(sop_uid: str) -> Path:
    """A new, unique path for a quarantined copy of ``sop_uid`` (there may be several)."""
    if not is_valid_uid(sop_uid):
        raise ValueError(f"not a valid DICOM UID: {sop_uid!r}")
    return Path("quarantine") / sop_uid / f"{uuid.uuid4().hex}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(data_dir: Path, relpath: Path, payload: bytes) -> Path:
    """Write ``payload`` to ``data_dir/relpath`` atomically and durably; return the path."""
    staged = stage_bytes(data_dir, payload)
    try:
        final, dirs = place_staged(data_dir, staged, relpath)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dirs(dirs)
    return final


def stage_bytes(data_dir: Path, payload: bytes) -> Path:
    """Write ``payload`` to a new ``incoming/<random>.part`` and fsync it; return its path.

    The staged file is durable but not yet anywhere a reader looks: ``place_staged``
    renames it into the store once its row is about to be committed.
    """
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    part = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with open(part, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def stage_file(data_dir: Path, received: Path) -> Path:
    """Make a file received elsewhere durable in ``incoming/``; return the path to rename from.

    A file already on the data directory's file system (the gateway receives into
    ``incoming/``) is fsync'ed where it is: no copy. Another one (a temporary file on
    another file system) is copied into a new ``.part`` and fsync'ed. Raises OSError.
    """
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    if os.stat(received).st_dev == os.stat(incoming).st_dev:
        fd = os.open(received, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return received
    part = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with open(received, "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, COPY_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def place_staged(data_dir: Path, staged: Path, relpath: Path) -> tuple[Path, list[Path]]:
    """Rename a staged file to ``data_dir/relpath``; return it and the directories to fsync.

    The caller fsyncs the returned directories (``fsync_dirs``, once for a whole batch)
    before committing the rows that point at the files: the new name, and any directory
    made for it, must be durable before the row is. Raises OSError.
    """
    final = data_dir / relpath
    made = _make_dirs(final.parent)
    os.replace(staged, final)
    return final, [final.parent, *made]


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; returns the parents of the directories it created (their new entries need an fsync)."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    return [p.parent for p in missing]


def fsync_dirs(paths: list[Path]) -> None:
    """fsync each distinct directory once. Raises OSError."""
    for path in dict.fromkeys(paths):
        _fsync_dir(path)


def remove_file(data_dir: Path, relpath: Path) -> None:
    """Remove a stored file whose database row could not be committed."""
    path = data_dir / relpath
    try:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        log.error("could not remove uncommitted file", extra={"path": str(path), "error": str(exc)})


def clean_incoming(data_dir: Path, *, older_than: float | None = None) -> int:
    """Delete ``.part`` and ``rx-*.dcm`` files left by a crash mid-write or mid-receive (never acknowledged).

    ``older_than`` (a ``time.time()`` value): only files last modified before it, so a
    ``.part`` another process sharing the data directory is writing right now is kept.
    """
    removed = 0
    incoming = data_dir / "incoming"
    for part in [*incoming.glob("*.part"), *incoming.glob("rx-*.dcm")]:
        try:
            if older_than is not None and part.stat().st_mtime >= older_than:
                continue
            part.unlink()
        except FileNotFoundError:
            continue
        removed += 1
    return removed


def stored_files(data_dir: Path) -> set[str]:
    """Every ``.dcm`` under ``dicom/``, as paths relative to the data directory."""
    root = data_dir / "dicom"
    if not root.is_dir():
        return set()
    return {str(p.relative_to(data_dir)) for p in root.glob("*/*/*.dcm")}


def quarantined_files(data_dir: Path) -> set[str]:
    """Every ``.dcm`` under ``quarantine/``, as paths relative to the data directory."""
    root = data_dir / "quarantine"
    if not root.is_dir():
        return set()
    return {str(p.relative_to(data_dir)) for p in root.glob("*/*.dcm")}
