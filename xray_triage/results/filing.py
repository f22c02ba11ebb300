"""File an object we made into its source image's study, as durably as a received instance.

The file is written like ingest writes one (``files.write_durably``: fsync'ed, renamed into
``dicom/<study>/<series>/<sop>.dcm``) before its ``result_objects`` row and its
``ResultObjectStored`` event go into the caller's transaction; if that transaction rolls back,
the file is an orphan that the next start removes (``serve.reconcile_files``), and the object
is rebuilt under the same UID when the event is handled again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from xray_triage.events import ResultObjectStored
from xray_triage.results.common import encode
from xray_triage.store import outbox
from xray_triage.store.files import instance_relpath, write_durably
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyRef:
    """The study columns filing needs, copied out of a session (a ``Study`` row works as well)."""

    id: int
    study_instance_uid: str
    station_ae: str


@dataclass(frozen=True)
class Source:
    """What an object is made from: its study, the image it is about (None: the whole study),
    its ``source_key`` (``result_objects``) and the hash of its inputs."""

    study: Study | StudyRef
    instance_id: int | None
    kind: str
    category: str
    source_key: str
    content_sha256: str

    def detached(self) -> Source:
        """The same, with the study as plain values (usable after its session has closed)."""
        study = StudyRef(self.study.id, self.study.study_instance_uid, self.study.station_ae)
        return Source(study, self.instance_id, self.kind, self.category, self.source_key, self.content_sha256)


@dataclass(frozen=True)
class WrittenResult:
    """An object's file, written and fsync'ed in its study, whose row is not recorded yet."""

    relpath: str
    file_size: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str


def file_result(
    session: Session, data_dir: Path, dataset: Dataset, source: Source, version: int
) -> ResultObject:
    """Write ``dataset`` into the study and record it (row + ``ResultObjectStored``) in ``session``.

    Raises ``OSError`` when the file cannot be written (the caller's transaction then rolls back
    and the consumer retries), ``ValueError`` for a UID that is not a valid DICOM UID.
    """
    return record_result(session, write_result(data_dir, dataset, source), source, version)


def write_result(data_dir: Path, dataset: Dataset, source: Source) -> WrittenResult:
    """Write ``dataset``'s file durably (no database work: this may run outside any write
    transaction, ``AiResultsAhead``). Raises ``OSError``, ``ValueError`` as ``file_result``."""
    study_uid = str(dataset.StudyInstanceUID)
    if study_uid != source.study.study_instance_uid:
        raise ValueError(
            f"{source.kind} {dataset.SOPInstanceUID} is not in study {source.study.study_instance_uid}"
        )
    payload = encode(dataset)
    relpath = instance_relpath(study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
    write_durably(data_dir, relpath, payload)
    return WrittenResult(
        str(relpath),
        len(payload),
        str(dataset.SOPInstanceUID),
        str(dataset.SOPClassUID),
        str(dataset.SeriesInstanceUID),
        str(dataset.file_meta.TransferSyntaxUID),
    )


def record_result(session: Session, written: WrittenResult, source: Source, version: int) -> ResultObject:
    """Record a written object in ``session``: its ``result_objects`` row and ``ResultObjectStored``."""
    study_uid = source.study.study_instance_uid
    row = ResultObject(
        study_id=source.study.id,
        source_instance_id=source.instance_id,
        kind=source.kind,
        category=source.category,
        source_key=source.source_key,
        version=version,
        content_sha256=source.content_sha256,
        sop_instance_uid=written.sop_instance_uid,
        sop_class_uid=written.sop_class_uid,
        series_instance_uid=written.series_instance_uid,
        transfer_syntax_uid=written.transfer_syntax_uid,
        file_path=written.relpath,
        file_size=written.file_size,
    )
    session.add(row)
    session.flush()
    outbox.record(
        session,
        ResultObjectStored(
            study_uid, source.study.station_ae, row.sop_instance_uid, row.sop_class_uid, source.category
        ),
    )
    log.info(
        "result object filed",
        extra={
            "study_uid": study_uid,
            "kind": source.kind,
            "sop_uid": row.sop_instance_uid,
            "version": version,
        },
    )
    return row
