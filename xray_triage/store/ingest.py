"""Accept one received DICOM instance: validate, store as received, fsync, commit.

The order is the durability contract with the modality: the bytes are on disk
(fsync'ed, renamed into place) *before* the database row is committed, and the
caller answers Success only after this function returns an ``ok`` outcome. Any
failure returns a DICOM failure status (the modality will retry) and leaves no
file without a row and no row without a file.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from xray_triage.events import InstanceQuarantined, InstanceStored
from xray_triage.store import outbox
from xray_triage.store.completeness import dataset_offset, incompleteness
from xray_triage.store.db import Database
from xray_triage.store.dicom_meta import (
    DEFAULT_CHARACTER_SET,
    PROJECTION_CLASSES,
    InstanceMeta,
    extract_meta,
    is_triage_candidate,
)
from xray_triage.store.diskspace import StorageGuard
from xray_triage.store.files import (
    instance_relpath,
    is_valid_uid,
    quarantine_relpath,
    remove_file,
    write_durably,
)
from xray_triage.store.placement import Placement, place
from xray_triage.store.records import (
    QuarantineRecord,
    Receipt,
    add_instance,
    add_quarantined,
    find_quarantined_copy,
)

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

# How often a store re-decides where an instance goes when another association changed
# the answer between the decision and the commit (e.g. created the same study first).
MAX_PLACEMENT_ATTEMPTS = 3


@dataclass(frozen=True)
class IngestOutcome:
    status: int
    message: str
    instance_id: int | None = None
    duplicate: bool = False
    triage_queued: bool = False
    quarantine_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_SUCCESS

    @property
    def quarantined(self) -> bool:
        return self.quarantine_id is not None


@dataclass(frozen=True)
class TriagePolicy:
    modalities: list[str]
    body_parts: list[str]


class _PlacementChanged(Exception):
    """Where the instance goes changed between the decision and the commit: decide again."""


@dataclass(frozen=True)
class _Received:
    meta: InstanceMeta
    encoded: bytes
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    receive_ms: float | None


class Ingestor:
    """Stores instances for the gateway; safe to call from many association threads."""

    def __init__(
        self,
        data_dir: Path,
        db: Database,
        policy: TriagePolicy,
        default_character_set: str = DEFAULT_CHARACTER_SET,
        storage: StorageGuard | None = None,
    ) -> None:
        """``default_character_set``: decodes header text with no (0008,0005) that is not UTF-8.

        Whoever waits for queued triage jobs (the workers) listens for ``InstanceStored`` with
        ``triage_queued`` on ``db.events``: it is dispatched once the instance is committed.
        """
        self.data_dir = data_dir
        self.default_character_set = default_character_set
        self.db = db
        self.policy = policy
        self.storage = storage
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
        """Validate and durably store one instance; ``encoded`` is the Part 10 file as received.

        Returns Success once the file and its row are committed: filed into its study,
        or quarantined (``outcome.quarantined``) when its UIDs conflict with what is
        stored; an identical re-send from the same station is Success with nothing new.
        0xA900 for an invalid or incomplete data set, 0xA700 when storage cannot take it.
        """
        if self.storage is not None:
            refusal = self.storage.refusal(len(encoded))
            if refusal:
                return IngestOutcome(STATUS_OUT_OF_RESOURCES, refusal)
        meta = extract_meta(ds, default_character_set=self.default_character_set)
        problem = validate(ds, meta) or incompleteness(encoded, transfer_syntax_uid)
        if problem:
            return IngestOutcome(STATUS_DATASET_MISMATCH, problem)
        received = _Received(meta, encoded, transfer_syntax_uid, calling_ae, peer_address, receive_ms)
        lock = self._lock_for(meta.sop_instance_uid)
        with lock:
            try:
                for _attempt in range(MAX_PLACEMENT_ATTEMPTS):
                    try:
                        return self._store(received)
                    except _PlacementChanged:
                        continue
                return IngestOutcome(STATUS_OUT_OF_RESOURCES, "study changed while storing; retry")
            finally:
                self._release_lock(meta.sop_instance_uid)

    def _store(self, rx: _Received) -> IngestOutcome:
        meta = rx.meta
        try:
            with self.db.read_session() as session:
                plan = place(session, meta, rx.calling_ae)
                sha = ""
                if plan.reason is not None:
                    if plan.existing_instance_id is not None and self._same_as_stored(plan, rx):
                        return IngestOutcome(
                            STATUS_SUCCESS, "duplicate, already stored", plan.existing_instance_id, duplicate=True
                        )
                    sha = _dataset_sha256(rx.encoded)
                    copy_id = find_quarantined_copy(session, meta.sop_instance_uid, rx.calling_ae, sha)
                    if copy_id is not None:
                        return IngestOutcome(
                            STATUS_SUCCESS, "duplicate of a quarantined copy", duplicate=True, quarantine_id=copy_id
                        )
        except SQLAlchemyError as exc:
            log.error("database unavailable", extra={"error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"database unavailable: {exc}")

        if plan.reason is None:
            relpath = instance_relpath(meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid)
        else:
            relpath = quarantine_relpath(meta.sop_instance_uid)
        start = time.perf_counter()
        try:
            write_durably(self.data_dir, relpath, rx.encoded)
        except OSError as exc:
            log.error("cannot write DICOM file", extra={"path": str(relpath), "error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}")
        receipt = Receipt(
            relpath=str(relpath),
            file_size=len(rx.encoded),
            transfer_syntax_uid=rx.transfer_syntax_uid,
            calling_ae=rx.calling_ae,
            peer_address=rx.peer_address,
            receive_ms=rx.receive_ms,
            store_ms=None,
        )
        triage = plan.reason is None and is_triage_candidate(meta, self.policy.modalities, self.policy.body_parts)
        try:
            with self.db.session() as session:
                now = place(session, meta, rx.calling_ae)
                if (now.reason, now.existing_instance_id) != (plan.reason, plan.existing_instance_id):
                    raise _PlacementChanged
                if plan.reason is None:
                    instance = add_instance(session, meta, receipt, triage=triage)
                    instance.store_ms = round((time.perf_counter() - start) * 1000, 2)
                    instance_id, quarantine_id = instance.id, None
                    stored = InstanceStored(
                        meta.study_instance_uid, rx.calling_ae, meta.sop_instance_uid, meta.series_instance_uid,
                        instance.id, triage,
                    )  # fmt: skip
                    outbox.record(session, stored)
                else:
                    record = QuarantineRecord(plan.reason, plan.detail, plan.conflicting_station, sha)
                    instance_id, quarantine_id = None, add_quarantined(session, meta, receipt, record).id
                    kept_apart = InstanceQuarantined(
                        meta.study_instance_uid, rx.calling_ae, meta.sop_instance_uid, quarantine_id, plan.reason
                    )
                    outbox.record(session, kept_apart)
        except _PlacementChanged:
            # A quarantine name is new and unique; a study path is another's only if its row exists now.
            if plan.reason is not None or now.existing_instance_id is None:
                remove_file(self.data_dir, relpath)
            raise
        except IntegrityError as exc:
            # Another process committed the same SOP instance, study or series first: decide again.
            log.info("concurrent insert, deciding again", extra={"sop_uid": meta.sop_instance_uid, "error": str(exc)})
            if plan.reason is not None:
                remove_file(self.data_dir, relpath)
            raise _PlacementChanged from exc
        except SQLAlchemyError as exc:
            remove_file(self.data_dir, relpath)
            log.error("cannot commit instance row", extra={"sop_uid": meta.sop_instance_uid, "error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot record instance: {exc}")
        except BaseException:
            remove_file(self.data_dir, relpath)
            raise
        if quarantine_id is not None:
            log.warning(
                "C-STORE quarantined: kept apart, in no study, not triaged; see /admin",
                extra={
                    "calling_ae": rx.calling_ae,
                    "sop_uid": meta.sop_instance_uid,
                    "study_uid": meta.study_instance_uid,
                    "series_uid": meta.series_instance_uid,
                    "reason": plan.reason,
                    "conflicting_station": plan.conflicting_station,
                    "quarantine_id": quarantine_id,
                },
            )
            return IngestOutcome(STATUS_SUCCESS, f"quarantined: {plan.detail}", quarantine_id=quarantine_id)
        return IngestOutcome(STATUS_SUCCESS, "stored", instance_id, triage_queued=triage)

    def _same_as_stored(self, plan: Placement, rx: _Received) -> bool:
        """An idempotent re-send: same station, same transfer syntax, same data set bytes."""
        if plan.existing_calling_ae != rx.calling_ae or plan.existing_transfer_syntax != rx.transfer_syntax_uid:
            return False
        try:
            stored = (self.data_dir / plan.existing_file).read_bytes()
            return stored[dataset_offset(stored) :] == rx.encoded[dataset_offset(rx.encoded) :]
        except Exception as exc:  # an unreadable stored file: keep the new copy apart, never drop it
            log.error("cannot compare with the stored copy", extra={"path": plan.existing_file, "error": str(exc)})
            return False


def _dataset_sha256(encoded: bytes) -> str:
    return hashlib.sha256(encoded[dataset_offset(encoded) :]).hexdigest()


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
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = rows * cols * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) * frames
        expected = (bits + 7) // 8  # 1-bit pixels are packed across frames (PS3.5 8.1.1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image geometry (Rows/Columns/BitsAllocated) missing or invalid: {exc}"
    if len(raw) < expected:
        return (
            f"Pixel Data is {len(raw)} bytes, Rows x Columns x SamplesPerPixel x BitsAllocated/8 "
            f"x NumberOfFrames needs {expected} (truncated?)"
        )
    return None
