"""Accept one received DICOM instance: validate, store as received, fsync, commit.

The order is the durability contract with the modality: the bytes are on disk
(fsync'ed, renamed into place) *before* the database row is committed, and the
caller answers Success only after this function returns an ``ok`` outcome. Any
failure returns a DICOM failure status (the modality will retry) and leaves no
file without a row and no row without a file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from xray_triage.store.db import Database
from xray_triage.store.dicom_meta import (
    DEFAULT_CHARACTER_SET,
    PROJECTION_CLASSES,
    InstanceMeta,
    extract_meta,
    is_triage_candidate,
)
from xray_triage.store.files import instance_relpath, is_valid_uid, remove_file, write_durably
from xray_triage.store.records import Receipt, add_instance, find_instance

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    message: str
    instance_id: int | None = None
    duplicate: bool = False
    triage_queued: bool = False

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS


@dataclass(frozen=True)
class TriagePolicy:
    modalities: list[str]
    body_parts: list[str]


class Ingestor:
    """Stores instances for the gateway; safe to call from many association threads."""

    def __init__(
        self,
        data_dir: Path,
        db: Database,
        policy: TriagePolicy,
        on_job_queued: Callable[[], None] | None = None,
        default_character_set: str = DEFAULT_CHARACTER_SET,
    ) -> None:
        """``default_character_set``: decodes header text with no (0008,0005) that is not UTF-8."""
        self.data_dir = data_dir
        self.default_character_set = default_character_set
        self.db = db
        self.policy = policy
        self.on_job_queued = on_job_queued or (lambda: None)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock_for(self, sop_uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(sop_uid, threading.Lock())

    def _release_lock(self, sop_uid: str) -> None:
        with self._locks_guard:
            self._locks.pop(sop_uid, None)

    def ingest(
        self,
        ds: Dataset,
        encoded: bytes,
        *,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer_address: str,
        receive_ms: float | None = None,
    ) -> IngestOutcome:
        """Validate and durably store one instance; ``encoded`` is the file as received."""
        meta = extract_meta(ds, default_character_set=self.default_character_set)
        problem = validate(ds, meta)
        if problem:
            return IngestOutcome(STATUS_DATASET_MISMATCH, problem)
        lock = self._lock_for(meta.sop_instance_uid)
        with lock:
            try:
                return self._store(meta, encoded, transfer_syntax_uid, calling_ae, peer_address, receive_ms)
            finally:
                self._release_lock(meta.sop_instance_uid)

    def _store(
        self,
        meta: InstanceMeta,
        encoded: bytes,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer_address: str,
        receive_ms: float | None,
    ) -> IngestOutcome:
        try:
            with self.db.session() as session:
                existing = find_instance(session, meta.sop_instance_uid)
                if existing is not None:
                    return IngestOutcome(STATUS_SUCCESS, "duplicate, already stored", existing.id, duplicate=True)
        except SQLAlchemyError as exc:
            log.error("database unavailable", extra={"error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"database unavailable: {exc}")

        relpath = instance_relpath(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)
        start = time.perf_counter()
        try:
            write_durably(self.data_dir, relpath, encoded)
        except OSError as exc:
            log.error("cannot write DICOM file", extra={"path": str(relpath), "error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}")
        triage = is_triage_candidate(meta, self.policy.modalities, self.policy.body_parts)
        receipt = Receipt(
            relpath=str(relpath),
            file_size=len(encoded),
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae=calling_ae,
            peer_address=peer_address,
            receive_ms=receive_ms,
            store_ms=None,
        )
        try:
            with self.db.session() as session:
                instance = add_instance(session, meta, receipt, triage=triage)
                instance.store_ms = round((time.perf_counter() - start) * 1000, 2)
                instance_id = instance.id
        except IntegrityError:
            # Another process committed the same SOP instance first: it owns the file.
            return IngestOutcome(STATUS_SUCCESS, "duplicate, already stored", duplicate=True)
        except SQLAlchemyError as exc:
            remove_file(self.data_dir, relpath)
            log.error("cannot commit instance row", extra={"sop_uid": meta.sop_instance_uid, "error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot record instance: {exc}")
        except BaseException:
            remove_file(self.data_dir, relpath)
            raise
        if triage:
            self.on_job_queued()
        return IngestOutcome(STATUS_SUCCESS, "stored", instance_id, triage_queued=triage)


def validate(ds: Dataset, meta: InstanceMeta) -> str | None:
    """Why this dataset cannot be stored as an instance, or None if it can."""
    for keyword, value in (
        ("SOPClassUID", meta.sop_class_uid),
        ("SOPInstanceUID", meta.sop_instance_uid),
        ("StudyInstanceUID", meta.study_instance_uid),
        ("SeriesInstanceUID", meta.series_instance_uid),
    ):
        if not value:
            return f"{keyword} is missing"
        if not is_valid_uid(value):
            return f"{keyword} {value[:80]!r} is not a valid UID"
    if meta.sop_class_uid in PROJECTION_CLASSES and not meta.has_pixel_data:
        return "image without Pixel Data (7FE0,0010)"
    if meta.has_pixel_data:
        return _pixel_data_problem(ds)
    return None


def _pixel_data_problem(ds: Dataset) -> str | None:
    """Catch truncated pixel data without decoding the image (decoding is the worker's job)."""
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    try:
        raw = ds.PixelData
    except Exception as exc:  # a broken element header makes the value unreadable
        return f"Pixel Data unreadable: {exc}"
    if raw is None:
        return "Pixel Data is empty"
    if ts is not None and ts.is_encapsulated:
        try:
            fragments = list(generate_fragments(raw))
        except Exception as exc:
            return f"encapsulated Pixel Data is malformed or truncated: {exc}"
        if len(fragments) < 1 or not any(fragments):
            return "encapsulated Pixel Data has no fragments"
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        expected = rows * cols * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        expected *= int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image geometry (Rows/Columns/BitsAllocated) missing or invalid: {exc}"
    if len(raw) < expected:
        return f"Pixel Data is {len(raw)} bytes, Rows x Columns x BitsAllocated needs {expected} (truncated?)"
    return None
