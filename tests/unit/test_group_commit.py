"""Group commit (issue 17): concurrent associations' instances share one write transaction.

Real SQLite (or PostgreSQL in the PostgreSQL pass), real files. The leader's first commit is
held (an SQLAlchemy ``commit`` listener) until the other threads' instances are waiting, so
the batching is certain, not a matter of timing.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, func, select

from e2e_helpers import SHARED_DATA
from xray_triage.store.db import Database
from xray_triage.store.ingest import STATUS_OUT_OF_RESOURCES, Ingestor, IngestOutcome, TriagePolicy
from xray_triage.store.schema import Instance, TriageJob

SOURCE = SHARED_DATA / "dicom" / "dev_06_dx_pa_j2k_lossless.dcm"
pytestmark = pytest.mark.skipif(not SOURCE.is_file(), reason="shared DICOM data not found")
WAIT_S = 60.0  # bounded waits for the other threads: generous, never asserted


@pytest.fixture()
def db(database_url: str) -> Database:
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()


def _copies(n: int, study_uid: str | None = None) -> list[tuple[pydicom.Dataset, bytes]]:
    """``n`` new instances (new SOP Instance UIDs; new studies unless ``study_uid``) as Part 10 bytes."""
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(SOURCE)
        ds.StudyInstanceUID = study_uid or generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        raw = buffer.getvalue()
        out.append((pydicom.dcmread(io.BytesIO(raw)), raw))
    return out


def _ingest(ingestor: Ingestor, ds: pydicom.Dataset, raw: bytes) -> IngestOutcome:
    return ingestor.ingest(
        ds, raw, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="ST1", peer_address="127.0.0.1"
    )


def _wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class _HeldFirstCommit:
    """Holds the first COMMIT on ``db``'s write engine until ``release_when()`` is true; counts commits."""

    def __init__(self, db: Database, release_when) -> None:  # type: ignore[no-untyped-def]
        self.commits = 0
        self.release_when = release_when
        self.engine = db.engine
        event.listen(self.engine, "commit", self._on_commit)

    def _on_commit(self, _conn) -> None:  # type: ignore[no-untyped-def]
        self.commits += 1
        if self.commits == 1:
            _wait_until(self.release_when, "the other instances to queue behind the first commit")

    def close(self) -> None:
        event.remove(self.engine, "commit", self._on_commit)


def _run_threads(ingestor: Ingestor, items: list[tuple[pydicom.Dataset, bytes]]) -> list[IngestOutcome]:
    outcomes: list[IngestOutcome | None] = [None] * len(items)

    def send(i: int) -> None:
        outcomes[i] = _ingest(ingestor, *items[i])

    first = threading.Thread(target=send, args=(0,))
    first.start()
    _wait_until(lambda: ingestor.batches == 0 and ingestor._leading, "the first instance to lead")
    rest = [threading.Thread(target=send, args=(i,)) for i in range(1, len(items))]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(WAIT_S)
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def test_instances_waiting_behind_a_commit_share_the_next_one(tmp_path: Path, db: Database) -> None:
    ingestor = Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))
    items = _copies(8)
    held = _HeldFirstCommit(db, lambda: len(ingestor._pending) == 7)
    try:
        outcomes = _run_threads(ingestor, items)
    finally:
        held.close()
    assert all(o.ok and o.triage_queued and not o.duplicate for o in outcomes), outcomes
    assert (ingestor.batches, ingestor.batched) == (2, 8)  # the first alone, then the 7 that waited
    assert held.commits == 2
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 8
        assert s.scalar(select(func.count()).select_from(TriageJob)) == 8
        for ds, raw in items:
            path = s.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
            assert (tmp_path / "data" / path).read_bytes() == raw
    assert not list((tmp_path / "data" / "incoming").iterdir())


def test_one_instance_that_cannot_be_filed_fails_alone_in_its_batch(tmp_path: Path, db: Database) -> None:
    """Its staged file vanishes before the rename: 0xA700 for it, Success for the others, no stray row."""
    ingestor = Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))
    study = generate_uid()
    items = _copies(4, study_uid=study)  # one study: the batch's savepoints share its row
    victim: list[str] = []

    def queued_and_sabotaged() -> bool:
        if len(ingestor._pending) < 3:
            return False
        if not victim:
            job = ingestor._pending[1]
            job.received.staged.unlink()
            victim.append(job.received.meta.sop_instance_uid)
        return True

    held = _HeldFirstCommit(db, queued_and_sabotaged)
    try:
        outcomes = _run_threads(ingestor, items)
    finally:
        held.close()
    by_uid = {ds.SOPInstanceUID: o for (ds, _raw), o in zip(items, outcomes, strict=True)}
    failed = by_uid.pop(victim[0])
    assert failed.status == STATUS_OUT_OF_RESOURCES and "cannot write file" in failed.message
    assert all(o.ok for o in by_uid.values()), by_uid
    with db.read_session() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert uids == set(by_uid)
    stored = {p.stem for p in (tmp_path / "data" / "dicom").rglob("*.dcm")}
    assert stored == set(by_uid)


def test_the_same_instance_twice_in_one_batch_is_stored_once(tmp_path: Path, db: Database) -> None:
    ingestor = Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))
    (first,) = _copies(1)
    other = _copies(1)[0]
    items = [other, first, first]
    held = _HeldFirstCommit(db, lambda: len(ingestor._pending) == 2)
    try:
        outcomes = _run_threads(ingestor, items)
    finally:
        held.close()
    assert ingestor.batched == 3 and ingestor.batches == 2
    assert all(o.ok for o in outcomes)
    assert sorted(o.duplicate for o in outcomes[1:]) == [False, True]
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 2
    assert not list((tmp_path / "data" / "incoming").iterdir())


def test_a_received_file_is_renamed_into_the_store_not_copied(tmp_path: Path, db: Database) -> None:
    ingestor = Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))
    ((ds, raw),) = _copies(1)
    received = tmp_path / "data" / "incoming" / "rx-test.dcm"
    received.parent.mkdir(parents=True)
    received.write_bytes(raw)
    inode = received.stat().st_ino
    outcome = ingestor.ingest_file(
        received,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="ST1",
        peer_address="127.0.0.1",
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    assert outcome.ok and not received.exists()
    with db.read_session() as s:
        path = tmp_path / "data" / s.scalar(select(Instance.file_path))
    assert path.stat().st_ino == inode and path.read_bytes() == raw


def test_a_received_file_naming_another_instance_is_refused(tmp_path: Path, db: Database) -> None:
    ingestor = Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"]))
    ((ds, raw),) = _copies(1)
    received = tmp_path / "rx-other.dcm"
    received.write_bytes(raw)
    outcome = ingestor.ingest_file(
        received,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae="ST1",
        peer_address="127.0.0.1",
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=generate_uid(),
    )
    assert outcome.status == 0xA900 and "differs from the C-STORE request" in outcome.message
    with db.read_session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
