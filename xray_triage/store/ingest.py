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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from xray_triage.events import InstanceQuarantined, InstanceStored
from xray_triage.store import outbox
from xray_triage.store.completeness import DEFER_BYTES, dataset_sha256, incompleteness, same_dataset
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
    fsync_dirs,
    instance_relpath,
    is_valid_uid,
    place_staged,
    quarantine_relpath,
    stage_bytes,
    stage_file,
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

# How often a store re-decides where an instance goes when another process committed a
# conflicting row first (e.g. created the same study): each try is a new transaction.
MAX_PLACEMENT_ATTEMPTS = 3
# The most instances one group commit files (see ``Ingestor``).
DEFAULT_MAX_BATCH = 64


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


@dataclass(frozen=True)
class _Received:
    meta: InstanceMeta
    staged: Path  # the durable copy in incoming/, renamed into the store when its row is added
    file_size: int
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    receive_ms: float | None
    started: float  # perf_counter() when storing began (for ``store_ms``)


@dataclass(eq=False)
class _Job:
    """One instance waiting for its answer in the group commit."""

    received: _Received
    outcome: IngestOutcome | None = None
    leads: bool = False
    filed: bool = False  # its staged file was renamed into the store and its row committed
    wake: threading.Event = field(default_factory=threading.Event)


class Ingestor:
    """Stores instances for the gateway; safe to call from many association threads.

    **Group commit**: each association thread validates its instance and makes its file
    durable (fsync) on its own, in parallel; the rows are then committed by whichever
    waiting thread leads: it takes every instance waiting at that moment (up to
    ``max_batch``), files them in one write transaction (one savepoint each, so one bad
    instance fails alone), renames their files into place, fsyncs the directories once and
    commits once, then answers them all and hands the lead to the next waiting thread.
    While one batch commits, the next one gathers, so N concurrent associations share one
    database commit (one WAL fsync on SQLite) instead of queueing for N. Nothing waits for a
    timer: an instance that finds nobody committing is committed at once.
    """

    def __init__(
        self,
        data_dir: Path,
        db: Database,
        policy: TriagePolicy,
        default_character_set: str = DEFAULT_CHARACTER_SET,
        storage: StorageGuard | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        """``default_character_set``: decodes header text with no (0008,0005) that is not UTF-8.

        Whoever waits for queued triage jobs (the workers) listens for ``InstanceStored`` with
        ``triage_queued`` on ``db.events``: it is dispatched once the instance is committed.
        ``max_batch``: the most instances one group commit files (1: a commit each).
        """
        self.data_dir = data_dir
        self.default_character_set = default_character_set
        self.db = db
        self.policy = policy
        self.storage = storage
        self.max_batch = max(1, max_batch)
        self._pending: list[_Job] = []
        self._leading = False
        self._queue_lock = threading.Lock()
        self.batches = 0  # group commits run (for the logs, metrics and tests)
        self.batched = 0  # instances they filed

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
        arrival = (len(encoded), transfer_syntax_uid, calling_ae, peer_address, receive_ms)
        return self._stage_and_commit(meta, lambda: stage_bytes(self.data_dir, encoded), *arrival)

    def ingest_file(
        self,
        path: Path,
        *,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer_address: str,
        receive_ms: float | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> IngestOutcome:
        """``ingest`` for a Part 10 file as received (the gateway receives each C-STORE data set
        straight to a file): it is fsync'ed and renamed into the store, never held in memory
        or copied (unless it lies on another file system than the data directory).

        ``sop_class_uid`` / ``sop_instance_uid``: the C-STORE request's Affected SOP Class /
        Instance UID; a data set naming others is refused with 0xA900. ``path`` is renamed into
        the store when the instance is filed and removed when it is a re-send; it is left to
        the caller when refused before storing began. 0xC000 when it cannot be parsed at all.
        """
        try:
            size = path.stat().st_size
        except OSError as exc:
            return IngestOutcome(
                STATUS_OUT_OF_RESOURCES, f"received data set unreadable: {exc.strerror or exc}"
            )
        if self.storage is not None:
            refusal = self.storage.refusal(size)
            if refusal:
                return IngestOutcome(STATUS_OUT_OF_RESOURCES, refusal)
        try:
            ds = dcmread(path, defer_size=DEFER_BYTES)
            meta = extract_meta(ds, default_character_set=self.default_character_set)
        except Exception as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, f"cannot decode dataset: {exc}")
        if sop_instance_uid is not None and meta.sop_instance_uid != sop_instance_uid:
            return IngestOutcome(
                STATUS_DATASET_MISMATCH, "SOP Instance UID in the dataset differs from the C-STORE request"
            )
        if sop_class_uid is not None and meta.sop_class_uid != sop_class_uid:
            return IngestOutcome(
                STATUS_DATASET_MISMATCH, "SOP Class UID in the dataset differs from the C-STORE request"
            )
        problem = validate(ds, meta) or incompleteness(path, transfer_syntax_uid)
        del ds  # deferred values point at ``path``, which is about to move
        if problem:
            return IngestOutcome(STATUS_DATASET_MISMATCH, problem)
        arrival = (size, transfer_syntax_uid, calling_ae, peer_address, receive_ms)
        return self._stage_and_commit(meta, lambda: stage_file(self.data_dir, path), *arrival)

    def _stage_and_commit(
        self,
        meta: InstanceMeta,
        stage: Callable[[], Path],
        file_size: int,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer_address: str,
        receive_ms: float | None,
    ) -> IngestOutcome:
        """Make the instance's bytes durable in ``incoming/`` (``stage``), then file it (``_commit``)."""
        started = time.perf_counter()
        try:
            staged = stage()
        except OSError as exc:
            log.error("cannot write DICOM file", extra={"sop_uid": meta.sop_instance_uid, "error": str(exc)})
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}")
        rx = _Received(
            meta, staged, file_size, transfer_syntax_uid, calling_ae, peer_address, receive_ms, started
        )
        return self._commit(rx)

    # -- group commit -----------------------------------------------------------------

    def _commit(self, rx: _Received) -> IngestOutcome:
        """Wait for (or lead) the group commit that files ``rx``; its staged file is filed or removed."""
        job = _Job(rx)
        with self._queue_lock:
            self._pending.append(job)
            if not self._leading:  # nobody is committing: lead (the queue was empty)
                self._leading = job.leads = True
        while True:
            if not job.leads:
                job.wake.wait()
                job.wake.clear()
            if job.outcome is not None:
                break
            # Leading: commit what is waiting now (this job is first in line), then hand over.
            with self._queue_lock:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
            try:
                self._file_batch(batch)
            finally:
                with self._queue_lock:
                    if self._pending:
                        successor = self._pending[0]
                        successor.leads = True
                        successor.wake.set()
                    else:
                        self._leading = False
                for other in batch:
                    other.wake.set()
            job.leads = False
        assert job.outcome is not None
        if not job.filed:
            _unlink(rx.staged)  # refused, or a re-send: the received copy goes
        return job.outcome

    def _file_batch(self, batch: list[_Job]) -> None:
        """File ``batch`` in as few write transactions as possible; sets every job's outcome."""
        todo = batch
        try:
            for _attempt in range(MAX_PLACEMENT_ATTEMPTS):
                todo = self._file_once(todo)
                if not todo:
                    break
            for job in todo:
                job.outcome = IngestOutcome(STATUS_OUT_OF_RESOURCES, "study changed while storing; retry")
        except Exception as exc:  # never leave a waiting association without an answer
            log.exception("group commit failed", extra={"instances": len(batch)})
            for job in batch:
                if job.outcome is None:
                    job.outcome = IngestOutcome(STATUS_OUT_OF_RESOURCES, f"internal error: {exc}")
        self.batches += 1
        self.batched += len(batch)
        if len(batch) > 1:
            log.debug("group commit", extra={"instances": len(batch)})

    def _file_once(self, jobs: list[_Job]) -> list[_Job]:
        """One write transaction for ``jobs``; returns those to decide again (another writer won a race).

        Each instance of a batch gets a savepoint, so one that cannot be filed (its rename
        fails, or a concurrent writer committed the same UIDs first) fails or is decided
        again alone. A batch of one needs no savepoint (two statements fewer): the failure
        rolls its whole transaction back instead.
        """
        placed: list[tuple[_Job, Path, IngestOutcome]] = []  # renamed into the store, outcome on commit
        answered: list[tuple[_Job, IngestOutcome]] = []  # decided without filing anything
        again: list[_Job] = []
        dirs: list[Path] = []
        alone = len(jobs) == 1
        try:
            with self.db.session() as session:
                for job in jobs:
                    try:
                        with nullcontext() if alone else session.begin_nested():
                            result = self._file_one(session, job.received, dirs)
                    except (IntegrityError, OSError) as exc:
                        if alone:
                            raise  # roll the transaction back; handled below
                        _one_failed(job, exc, again, answered)
                        continue
                    outcome, final = result
                    if final is None:
                        answered.append((job, outcome))
                    else:
                        placed.append((job, final, outcome))
                fsync_dirs(dirs)  # the new names are durable before the rows that point at them
        except (IntegrityError, OSError) as exc:
            for _job, final, _outcome in placed:
                _unlink(final)
            if not alone or placed:  # a directory fsync or the commit itself failed
                return self._all_failed(jobs, exc)
            _one_failed(jobs[0], exc, again, answered)
        except SQLAlchemyError as exc:
            for _job, final, _outcome in placed:
                _unlink(final)
            return self._all_failed(jobs, exc)
        except BaseException:
            for _job, final, _outcome in placed:
                _unlink(final)
            raise
        for job, outcome in answered:
            job.outcome = outcome
        for job, _final, outcome in placed:
            job.outcome = outcome
            job.filed = True
            if outcome.quarantined:
                self._log_quarantined(job.received, outcome)
        return again

    @staticmethod
    def _all_failed(jobs: list[_Job], exc: BaseException) -> list[_Job]:
        log.error("cannot commit instance rows", extra={"instances": len(jobs), "error": str(exc)})
        for job in jobs:
            job.outcome = IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot record instance: {exc}")
        return []

    def _file_one(
        self, session: Session, rx: _Received, dirs: list[Path]
    ) -> tuple[IngestOutcome, Path | None]:
        """Decide where ``rx`` goes and add its rows in ``session``; rename its file into place.

        Returns the outcome and the file's new path (None when nothing was filed: a re-send).
        Raises IntegrityError (a concurrent writer), OSError (the rename).
        """
        meta = rx.meta
        plan = place(session, meta, rx.calling_ae)
        sha = ""
        if plan.reason is not None:
            if plan.existing_instance_id is not None and self._same_as_stored(plan, rx):
                return IngestOutcome(
                    STATUS_SUCCESS, "duplicate, already stored", plan.existing_instance_id, duplicate=True
                ), None
            sha = dataset_sha256(rx.staged)
            copy_id = find_quarantined_copy(session, meta.sop_instance_uid, rx.calling_ae, sha)
            if copy_id is not None:
                return IngestOutcome(
                    STATUS_SUCCESS, "duplicate of a quarantined copy", duplicate=True, quarantine_id=copy_id
                ), None
        if plan.reason is None:
            relpath = instance_relpath(
                meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid
            )
        else:
            relpath = quarantine_relpath(meta.sop_instance_uid)
        receipt = Receipt(
            relpath=str(relpath),
            file_size=rx.file_size,
            transfer_syntax_uid=rx.transfer_syntax_uid,
            calling_ae=rx.calling_ae,
            peer_address=rx.peer_address,
            receive_ms=rx.receive_ms,
            store_ms=None,
        )
        if plan.reason is None:
            triage = is_triage_candidate(meta, self.policy.modalities, self.policy.body_parts)
            receipt = replace(receipt, store_ms=round((time.perf_counter() - rx.started) * 1000, 2))
            instance_id = add_instance(session, meta, receipt, triage=triage)
            stored = InstanceStored(
                meta.study_instance_uid, rx.calling_ae, meta.sop_instance_uid, meta.series_instance_uid,
                instance_id, triage,
            )  # fmt: skip
            outbox.record(session, stored)
            outcome = IngestOutcome(STATUS_SUCCESS, "stored", instance_id, triage_queued=triage)
        else:
            record = QuarantineRecord(plan.reason, plan.detail, plan.conflicting_station, sha)
            quarantine_id = add_quarantined(session, meta, receipt, record).id
            outbox.record(
                session,
                InstanceQuarantined(
                    meta.study_instance_uid, rx.calling_ae, meta.sop_instance_uid, quarantine_id, plan.reason
                ),
            )
            outcome = IngestOutcome(
                STATUS_SUCCESS, f"quarantined: {plan.detail}", quarantine_id=quarantine_id
            )
        session.flush()  # an IntegrityError surfaces here, before the file moves
        final, made = place_staged(self.data_dir, rx.staged, relpath)
        dirs.extend(made)
        return outcome, final

    def _log_quarantined(self, rx: _Received, outcome: IngestOutcome) -> None:
        log.warning(
            "C-STORE quarantined: kept apart, in no study, not triaged; see /admin",
            extra={
                "calling_ae": rx.calling_ae,
                "sop_uid": rx.meta.sop_instance_uid,
                "study_uid": rx.meta.study_instance_uid,
                "series_uid": rx.meta.series_instance_uid,
                "why": outcome.message,
                "quarantine_id": outcome.quarantine_id,
            },
        )

    def _same_as_stored(self, plan: Placement, rx: _Received) -> bool:
        """An idempotent re-send: same station, same transfer syntax, same data set bytes."""
        if (
            plan.existing_calling_ae != rx.calling_ae
            or plan.existing_transfer_syntax != rx.transfer_syntax_uid
        ):
            return False
        try:
            return same_dataset(self.data_dir / plan.existing_file, rx.staged)
        except Exception as exc:  # an unreadable stored file: keep the new copy apart, never drop it
            log.error(
                "cannot compare with the stored copy", extra={"path": plan.existing_file, "error": str(exc)}
            )
            return False


def _one_failed(
    job: _Job, exc: BaseException, again: list[_Job], answered: list[tuple[_Job, IngestOutcome]]
) -> None:
    """Sort one instance's failure: decide it again (a concurrent writer won), or answer 0xA700."""
    sop_uid = job.received.meta.sop_instance_uid
    if isinstance(exc, IntegrityError):
        # Another process committed the same SOP instance, study or series first.
        log.info("concurrent insert, deciding again", extra={"sop_uid": sop_uid, "error": str(exc)})
        again.append(job)
        return
    strerror = getattr(exc, "strerror", None)
    log.error("cannot file DICOM file", extra={"sop_uid": sop_uid, "error": str(exc)})
    answered.append((job, IngestOutcome(STATUS_OUT_OF_RESOURCES, f"cannot write file: {strerror or exc}")))


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("could not remove a file that was not stored", extra={"path": str(path), "error": str(exc)})


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
    """Catch truncated pixel data without decoding the image (decoding is the worker's job).

    Native Pixel Data is checked by its declared length, without reading it (a data set read
    with ``defer_size`` leaves it on disk); encapsulated Pixel Data (undefined length, read
    by pydicom) is walked fragment by fragment.
    """
    ts = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    encapsulated = ts is not None and ts.is_encapsulated
    try:
        elem = ds.get_item(0x7FE00010, keep_deferred=True)
        deferred = (
            isinstance(elem, RawDataElement) and elem.value is None and elem.length not in (0, 0xFFFFFFFF)
        )
        if deferred and not encapsulated:
            size, raw = elem.length, None  # deferred: its bytes were bounds-checked, not read
        else:
            raw = ds.PixelData
            size = len(raw) if raw is not None else 0
    except Exception as exc:  # a broken element header makes the value unreadable
        return f"Pixel Data unreadable: {exc}"
    if raw is None and size == 0:
        return "Pixel Data is empty"
    if encapsulated:
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
    if size < expected:
        return (
            f"Pixel Data is {size} bytes, Rows x Columns x SamplesPerPixel x BitsAllocated/8 "
            f"x NumberOfFrames needs {expected} (truncated?)"
        )
    return None
