"""Turn outbox events into filed DICOM result objects (the ``results`` outbox consumer).

``handle`` is ``OutboxConsumer``'s handler: for ``TriageCompleted`` it files the AI SR and the
AI GSPS of the image; for ``AnnotationChanged`` the marks GSPS of each image of the study whose
marks changed; for ``ConsultAnswered`` and ``ReplyPosted`` with status ``answered`` the consult
SR. Everything goes into the consumer's transaction. Idempotent: an object is keyed by what it
is made from (``source_key``) and the hash of its inputs, so handling an event again files
nothing new, and a changed input files a new version (a new SOP Instance UID; the consult SR
references its predecessors).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from xray_triage.events import AnnotationChanged, ConsultAnswered, Event, ReplyPosted, TriageCompleted
from xray_triage.inference.card import ModelCard
from xray_triage.results import ai_gsps, ai_sr, annotation_gsps, consult_sr
from xray_triage.results.common import content_hash, read_source
from xray_triage.results.filing import Source, WrittenResult, file_result, record_result, write_result
from xray_triage.store.consult_schema import CONSULT_ANSWERED, Annotation, Consult, User
from xray_triage.store.db import Database
from xray_triage.store.outbox import StoredEvent
from xray_triage.store.result_objects import CATEGORY_AI, CATEGORY_CONSULT, ResultObject, latest_version
from xray_triage.store.schema import Instance, Series, Study

log = logging.getLogger(__name__)

CONSUMER = "results"  # the outbox cursor's name; never rename it (the consumer would start over)


def local_now() -> datetime:
    """The server's local time: DICOM dates and times are local (the study's, copied from the
    image, are the station's), so our Content/Presentation Creation times are too."""
    return datetime.now().astimezone()


@dataclass(frozen=True)
class ResultsConfig:
    """What the builders need besides the event: the data directory, the model's card, the UID root."""

    data_dir: Path
    card: ModelCard
    uid_root: str = ""
    clock: Callable[[], datetime] = local_now


class CannotBuild(Exception):
    """An object cannot be made from what is stored (an unreadable source file, a header highdicom
    refuses): logged and skipped, since trying again would fail the same way and would stop the
    consumer for every later event."""


def wants(_session: Session, event: Event) -> bool:
    """The events ``handle`` acts on (the consumer's ``wants``: the rest, such as every
    ``InstanceStored``, are skipped without a write transaction, ``outbox_consumer.py``)."""
    return isinstance(event, (TriageCompleted, AnnotationChanged, ConsultAnswered)) or (
        isinstance(event, ReplyPosted) and event.status == CONSULT_ANSWERED
    )


def handle(
    session: Session, stored: StoredEvent, config: ResultsConfig, ahead: AiResultsAhead | None = None
) -> None:
    """File the result objects ``stored.event`` calls for (nothing for other events).

    ``ahead``: AI objects it made before this transaction are only recorded here (when still
    the versions to file); anything else is made here. Raises what the store raises (a full
    disk, a database error): the consumer's batch rolls back and is tried again. An object that
    cannot be built is logged (naming the image) and skipped.
    """
    event = stored.event
    try:
        if isinstance(event, TriageCompleted):
            ready = ahead.take(stored.id) if ahead is not None else None
            if ready is None or not record_ready(session, ready):
                file_ai_results(session, event.instance_id, config)
        elif isinstance(event, AnnotationChanged):
            file_annotation_results(session, event.study_uid, config)
        elif isinstance(event, ConsultAnswered) or (
            isinstance(event, ReplyPosted) and event.status == CONSULT_ANSWERED
        ):
            file_consult_result(session, event.consult_id, config)
    except CannotBuild as exc:
        log.error(
            "result object not made: %s",
            exc,
            extra={"event": event.type, "event_id": stored.id, "study_uid": event.study_uid},
        )


def _source(config: ResultsConfig, instance: Instance) -> Dataset:
    try:
        return read_source(config.data_dir, instance.file_path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise CannotBuild(f"image {instance.sop_instance_uid} cannot be read: {type(exc).__name__}") from exc


@contextmanager
def _building(what: str, instance_uid: str) -> Iterator[None]:
    """Turn highdicom's refusal of a header into ``CannotBuild`` naming the image."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise CannotBuild(f"{what} of image {instance_uid}: {exc}") from exc


def _next_version(session: Session, source_key: str, digest: str) -> tuple[int, ResultObject | None] | None:
    """(version to file, previous version) or None when the latest version has these inputs."""
    latest = latest_version(session, source_key)
    if latest is not None and latest.content_sha256 == digest:
        return None
    return (latest.version + 1 if latest else 1), latest


def _instance(session: Session, instance_id: int) -> tuple[Instance, Study] | None:
    row = session.execute(
        select(Instance, Study)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.id == instance_id)
        .options(selectinload(Instance.result))
    ).first()
    return (row[0], row[1]) if row else None


def file_ai_results(session: Session, instance_id: int, config: ResultsConfig) -> list[ResultObject]:
    """The AI SR and AI GSPS of one triaged image (nothing when it has no result)."""
    return [
        file_result(session, config.data_dir, dataset, source, version)
        for dataset, source, version in plan_ai_results(session, instance_id, config)
    ]


def plan_ai_results(
    session: Session, instance_id: int, config: ResultsConfig
) -> list[tuple[Dataset, Source, int]]:
    """Build the AI SR and AI GSPS of one triaged image that are not filed yet (reads only):
    each object with its ``Source`` and version. Raises ``CannotBuild``."""
    found = _instance(session, instance_id)
    if found is None or found[0].result is None:
        return []
    instance, study = found
    result = instance.result
    inputs = {
        "model": config.card.sha256,
        "uid_root": config.uid_root,
        "flagged": result.flagged,
        "probabilities": result.probabilities,
        "thresholds": result.thresholds,
        "heatmaps": result.heatmaps,
        "priority": result.priority,
        "study_priority": study.priority,
    }
    digest = content_hash(inputs)
    source: Dataset | None = None
    planned = []
    now = config.clock()
    for kind in (ai_sr.KIND, ai_gsps.KIND):
        key = f"{kind}:{instance.sop_instance_uid}"
        plan = _next_version(session, key, digest)
        if plan is None:
            continue
        source = source if source is not None else _source(config, instance)
        version = plan[0]
        if kind == ai_sr.KIND:
            content = ai_sr.AiResult(
                result.flagged,
                result.probabilities,
                result.thresholds,
                result.heatmaps,
                result.priority,
                study.priority,
            )
            with _building("AI SR", instance.sop_instance_uid):
                dataset = ai_sr.build_ai_sr(
                    source,
                    content,
                    config.card,
                    uid_root=config.uid_root,
                    version=version,
                    content_sha256=digest,
                    now=now,
                )
        else:
            with _building("AI GSPS", instance.sop_instance_uid):
                dataset = ai_gsps.build_ai_gsps(
                    source,
                    result.flagged,
                    result.probabilities,
                    result.heatmaps,
                    config.card,
                    uid_root=config.uid_root,
                    version=version,
                    content_sha256=digest,
                    now=now,
                )
        planned.append((dataset, Source(study, instance.id, kind, CATEGORY_AI, key, digest), version))
    return planned


def _author(user: User | None) -> str:
    return (user.display_name or user.username) if user is not None else ""


def file_annotation_results(session: Session, study_uid: str, config: ResultsConfig) -> list[ResultObject]:
    """A marks GSPS for each image of the study whose marks differ from its latest one.

    The whole study is looked at (the event may name a mark that was deleted since), so an
    image whose last mark was deleted gets a new version with no marks.
    """
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return []
    marks = session.scalars(
        select(Annotation)
        .where(Annotation.study_id == study.id)
        .options(selectinload(Annotation.author))
        .order_by(Annotation.id)
    ).all()
    by_instance: dict[int, list[Annotation]] = {}
    for mark in marks:
        by_instance.setdefault(mark.instance_id, []).append(mark)
    had = session.scalars(
        select(ResultObject.source_instance_id).where(
            ResultObject.study_id == study.id, ResultObject.kind == annotation_gsps.KIND
        )
    ).all()
    filed = []
    for instance_id in sorted(set(by_instance) | {i for i in had if i is not None}):
        instance = session.get(Instance, instance_id)
        if instance is None:
            continue
        current = [
            annotation_gsps.Mark(
                m.id, m.kind, dict(m.geometry), m.label or "", _author(m.author), m.updated_at
            )
            for m in by_instance.get(instance_id, [])
        ]
        digest = content_hash(
            {
                "uid_root": config.uid_root,
                "marks": [[m.id, m.kind, m.geometry, m.label, m.author] for m in current],
            }
        )
        key = f"{annotation_gsps.KIND}:{instance.sop_instance_uid}"
        plan = _next_version(session, key, digest)
        if plan is None:
            continue
        source = _source(config, instance)
        version = plan[0]
        with _building("marks GSPS", instance.sop_instance_uid):
            dataset = annotation_gsps.build_annotation_gsps(
                source,
                current,
                uid_root=config.uid_root,
                version=version,
                content_sha256=digest,
                now=config.clock(),
            )
        filed.append(
            file_result(
                session,
                config.data_dir,
                dataset,
                Source(study, instance.id, annotation_gsps.KIND, CATEGORY_CONSULT, key, digest),
                plan[0],
            )
        )
    return filed


def file_consult_result(session: Session, consult_id: int, config: ResultsConfig) -> ResultObject | None:
    """The consult's SR, when it is answered and differs from its latest version."""
    consult = session.get(Consult, consult_id)
    if consult is None or consult.status != CONSULT_ANSWERED:
        return None
    study = session.get(Study, consult.study_id)
    first_image = session.scalar(
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == consult.study_id)
        .order_by(Instance.id)
        .limit(1)
    )
    if study is None or first_image is None:
        return None
    content = consult_sr.ConsultContent(
        consult_id=consult.id,
        question=consult_sr.ThreadEntry(_author(consult.requested_by), consult.question, consult.created_at),
        conclusion=consult.conclusion,
        specialist=_author(consult.claimed_by),
        messages=[consult_sr.ThreadEntry(_author(m.author), m.body, m.created_at) for m in consult.messages],
    )
    digest = content_hash(
        {
            "uid_root": config.uid_root,
            "question": consult.question,
            "conclusion": consult.conclusion,
            "specialist": content.specialist,
            "messages": [[m.id, m.author_id, m.body] for m in consult.messages],
        }
    )
    key = f"{consult_sr.KIND}:{consult.id}"
    plan = _next_version(session, key, digest)
    if plan is None:
        return None
    version, latest = plan
    previous = []
    if latest is not None:
        try:
            previous = [pydicom.dcmread(config.data_dir / latest.file_path, stop_before_pixels=True)]
        except (OSError, InvalidDicomError) as exc:
            raise CannotBuild(
                f"consult {consult.id}: version {latest.version} cannot be read: {exc}"
            ) from exc
    source = _source(config, first_image)
    with _building(f"consult {consult.id} SR", first_image.sop_instance_uid):
        dataset = consult_sr.build_consult_sr(
            source,
            content,
            uid_root=config.uid_root,
            version=version,
            content_sha256=digest,
            now=config.clock(),
            previous=previous,
        )
    return file_result(
        session,
        config.data_dir,
        dataset,
        Source(study, None, consult_sr.KIND, CATEGORY_CONSULT, key, digest),
        version,
    )


@dataclass(frozen=True)
class _Ready:
    """An AI object made ahead: its file is written, its row not recorded."""

    written: WrittenResult
    source: Source
    version: int


def record_ready(session: Session, ready: list[_Ready]) -> bool:
    """Record objects made ahead, in ``session``; False (nothing recorded) when any is no longer
    the version to file (another copy of the consumer filed first): the caller makes them again."""
    todo = []
    for item in ready:
        plan = _next_version(session, item.source.source_key, item.source.content_sha256)
        if plan is None:
            continue  # filed already, with these inputs (under the same UID: the same file)
        if plan[0] != item.version:
            return False
        todo.append(item)
    for item in todo:
        record_result(session, item.written, item.source, item.version)
    return True


class AiResultsAhead:
    """Makes a triaged image's AI SR and AI GSPS *before* the consumer's write transaction.

    Building them (highdicom, reading the source header, encoding, fsync) took a median 174 ms
    (p90 487 ms) on a 2-core machine; done in ``handle`` it held SQLite's one write lock that
    long for every triaged image, so under a burst the gateway's C-STORE commits queued behind
    it (issue 17). ``prepare`` (the consumer's ``prepare`` hook, run before its write
    transaction) builds them in a read-only session and writes their files; ``handle`` then
    only records the rows (``record_ready``), or builds them itself when nothing was prepared.
    A file written ahead whose row is never recorded (a crash in between) is an orphan the next
    start removes; the object is made again under the same UID.
    """

    def __init__(self, db: Database, config: ResultsConfig) -> None:
        self.db = db
        self.config = config
        self._ready: dict[int, list[_Ready]] = {}
        self._lock = threading.Lock()

    def prepare(self, stored: StoredEvent) -> None:
        if not isinstance(stored.event, TriageCompleted):
            return
        try:
            with self.db.read_session() as session:
                planned = [
                    (dataset, source.detached(), version)
                    for dataset, source, version in plan_ai_results(
                        session, stored.event.instance_id, self.config
                    )
                ]
            ready = [
                _Ready(write_result(self.config.data_dir, dataset, source), source, version)
                for dataset, source, version in planned
            ]
        except (CannotBuild, OSError, ValueError):
            return  # ``handle`` makes them in its transaction and reports what fails, as before
        with self._lock:
            self._ready = {stored.id: ready}  # only the event about to be handled is kept

    def take(self, event_id: int) -> list[_Ready] | None:
        """What ``prepare`` made for the event ``event_id`` (None: nothing was prepared)."""
        with self._lock:
            return self._ready.pop(event_id, None)
