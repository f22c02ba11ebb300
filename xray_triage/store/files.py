"""Durable DICOM files under the data directory.

Layout (one file per SOP instance, easy to inspect with dcmdump)::

    <data_dir>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <data_dir>/quarantine/<SOPInstanceUID>/<random>.dcm   (kept apart: see ingest.py)
    <data_dir>/incoming/<random>.part        (only while a file is being written)

A file is written to ``incoming/`` first, flushed and fsync'ed, then renamed
into place and its directory fsync'ed: a crash at any point leaves either no
file or a complete one, never a half-written ``.dcm``.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

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
    incoming = data_dir / "incoming"
    final = data_dir / relpath
    incoming.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = incoming / f"{uuid.uuid4().hex}.part"
    try:
        with open(part, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def remove_file(data_dir: Path, relpath: Path) -> None:
    """Remove a stored file whose database row could not be committed."""
    path = data_dir / relpath
    try:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as exc:
        log.error("could not remove uncommitted file", extra={"path": str(path), "error": str(exc)})


def clean_incoming(data_dir: Path, *, older_than: float | None = None) -> int:
    """Delete ``.part`` files left by a crash mid-write (never acknowledged).

    ``older_than`` (a ``time.time()`` value): only files last modified before it, so a
    ``.part`` another process sharing the data directory is writing right now is kept.
    """
    removed = 0
    for part in (data_dir / "incoming").glob("*.part"):
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
