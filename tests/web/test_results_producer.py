"""The results producer through the real writers: ingest, triage worker, annotation API, consult rules.

An image is stored (``Ingestor``) and triaged (the worker, tiny model flagging every label);
the ``results`` outbox consumer is drained; the AI SR and GSPS must be filed in the image's
study (file + row + ``ResultObjectStored``) without becoming an image of the study. Marks made
through the web API and a consult answered through ``consults/rules.py`` make the specialist
objects, re-sent as new versions when they change; draining again files nothing twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from dicom_validators import dciodvfy, dsrdump
from sqlalchemy import select, update
from web_helpers import (
    WebEnv,
    add_station_row,
    add_user_row,
    client_for,
    make_web_env,
    store_dicom,
    triage_all,
)

from onnx_factory import write_tiny_model_dir
from xray_triage.consults import rules
from xray_triage.events import ResultObjectStored
from xray_triage.inference.card import load_card
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.results import producer
from xray_triage.store import outbox
from xray_triage.store.consult_schema import Consult
from xray_triage.store.outbox import OutboxCursor
from xray_triage.store.queries import get_study
from xray_triage.store.result_objects import ResultObject
from xray_triage.store.schema import Instance, Study
from xray_triage.store.users import get_user, to_auth_user

ROOT = "1.2.826.0.1.3680043.10.777"
NOW = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    write_tiny_model_dir(directory, thresholds={"Abnormal": 0.0, "Effusion": 0.0, "Pneumothorax": 0.0})
    with open(directory / "model.toml", "a", encoding="utf-8") as card:
        card.write('\n[codes.Effusion]\nscheme = "SCT"\nvalue = "60046008"\nmeaning = "Pleural effusion"\n')
    return directory


@pytest.fixture()
def env(tmp_path: Path, model_dir: Path, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path, model_dir=model_dir)
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    env.study, env.sop = store_dicom(env, shared_dicom / "dev_01_dx_pa_explicit_window.dcm", "STATION1")  # type: ignore[attr-defined]
    assert triage_all(env) == 1
    return env


def _consumer(env: WebEnv) -> OutboxConsumer:
    config = producer.ResultsConfig(env.data_dir, load_card(env.model_dir), ROOT, clock=lambda: NOW)
    return OutboxConsumer(  # with the server's predicate: what it skips must change no result
        env.db, producer.CONSUMER, lambda session, stored: producer.handle(session, stored, config), wants=producer.wants
    )


def _objects(env: WebEnv) -> list[ResultObject]:
    with env.db.read_session() as session:
        rows = list(session.scalars(select(ResultObject).order_by(ResultObject.id)))
        session.expunge_all()
        return rows


def _stored_events(env: WebEnv) -> list[ResultObjectStored]:
    with env.db.read_session() as session:
        events, _ = outbox.read_after(session, 0, 10_000)
    return [e.event for e in events if isinstance(e.event, ResultObjectStored)]


def test_triaged_image_gets_ai_sr_and_gsps_in_its_study(env: WebEnv) -> None:
    with env.db.read_session() as session:
        before = get_study(session, env.study)  # type: ignore[attr-defined]
    assert _consumer(env).drain() > 0
    objects = _objects(env)
    assert [(o.kind, o.category, o.version) for o in objects] == [("ai-sr", "ai-results", 1), ("ai-gsps", "ai-results", 1)]
    for row in objects:
        path = env.data_dir / row.file_path
        assert row.file_path == f"dicom/{env.study}/{row.series_instance_uid}/{row.sop_instance_uid}.dcm"  # type: ignore[attr-defined]
        assert dciodvfy(path) == []
        written = pydicom.dcmread(path)
        assert written.StudyInstanceUID == env.study and written.PatientID == "TA00009745"  # type: ignore[attr-defined]
        assert written.SOPInstanceUID.startswith(ROOT + ".") and written.SOPClassUID == row.sop_class_uid
    text = dsrdump(env.data_dir / objects[0].file_path)
    assert '(60046008,SCT,"Pleural effusion")' in text and "PNEUMOTHORAX,99XRAYTRIAGE" in text
    assert '"AI triage priority")=(URGENT' in text and env.sop in text  # type: ignore[attr-defined]
    events = _stored_events(env)
    assert [(e.sop_instance_uid, e.category, e.station_ae, e.study_uid) for e in events] == [
        (o.sop_instance_uid, "ai-results", "STATION1", env.study) for o in objects  # type: ignore[attr-defined]
    ]
    # Not an image of the study: same images, counts and priority as before.
    with env.db.read_session() as session:
        after = get_study(session, env.study)  # type: ignore[attr-defined]
    assert [i["sop_instance_uid"] for i in after["images"]] == [env.sop]  # type: ignore[attr-defined, index]
    assert (after["instances"], after["priority"], after["ai_status"]) == (  # type: ignore[index]
        before["instances"], before["priority"], before["ai_status"],  # type: ignore[index]
    )  # fmt: skip


def test_redelivered_events_file_nothing_twice(env: WebEnv) -> None:
    _consumer(env).drain()
    first = [(o.sop_instance_uid, o.file_size) for o in _objects(env)]
    with env.db.session() as session:  # as after a crash before the cursor's commit: everything again
        session.execute(update(OutboxCursor).where(OutboxCursor.consumer == producer.CONSUMER).values(last_id=0))
    assert _consumer(env).drain() > 0
    assert [(o.sop_instance_uid, o.file_size) for o in _objects(env)] == first
    assert len(_stored_events(env)) == 2


def test_marks_and_answered_consult_make_versioned_specialist_objects(env: WebEnv) -> None:
    consumer = _consumer(env)
    consumer.drain()
    client, csrf = client_for(env, "spec")
    url = f"/api/studies/{env.study}/annotations"  # type: ignore[attr-defined]
    body = {"instance_uid": env.sop, "kind": "rect", "geometry": {"x": 10, "y": 20, "w": 30, "h": 40}, "label": "mờ"}  # type: ignore[attr-defined]
    mark = client.post(url, json=body, headers={"X-CSRF-Token": csrf})
    assert mark.status_code in (200, 201), mark.text
    consumer.drain()
    marks = [o for o in _objects(env) if o.kind == "annotation-gsps"]
    assert [(o.version, o.category) for o in marks] == [(1, "consult-results")]
    gsps = pydicom.dcmread(env.data_dir / marks[0].file_path)
    assert dciodvfy(env.data_dir / marks[0].file_path) == []
    assert list(gsps.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicData[:2]) == [10, 20]
    assert gsps.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "mờ"
    # Deleting the only mark re-sends the image's marks, now none.
    deleted = client.delete(f"/api/annotations/{mark.json()['id']}", headers={"X-CSRF-Token": csrf})
    assert deleted.status_code in (200, 204), deleted.text
    consumer.drain()
    marks = [o for o in _objects(env) if o.kind == "annotation-gsps"]
    assert [o.version for o in marks] == [1, 2] and marks[0].sop_instance_uid != marks[1].sop_instance_uid
    assert "GraphicAnnotationSequence" not in pydicom.dcmread(env.data_dir / marks[1].file_path)
    assert dciodvfy(env.data_dir / marks[1].file_path) == []

    # A consult: requested by the station, answered by a specialist's reply, then concluded.
    with env.db.session() as session:
        station = to_auth_user(get_user(session, "st1"), None)  # type: ignore[arg-type]
        specialist = to_auth_user(get_user(session, "spec"), None)  # type: ignore[arg-type]
        study = session.scalar(select(Study).where(Study.study_instance_uid == env.study))  # type: ignore[attr-defined]
        consult_id = rules.request_consult(session, station, study, "Viêm phổi?", "urgent").id  # type: ignore[arg-type]
    consumer.drain()
    assert not [o for o in _objects(env) if o.kind == "consult-sr"]  # not answered yet
    with env.db.session() as session:
        rules.reply(session, specialist, session.get(Consult, consult_id), "Tràn dịch màng phổi, chuyển viện.")  # type: ignore[arg-type]
    consumer.drain()
    with env.db.session() as session:
        rules.conclude(session, specialist, session.get(Consult, consult_id), "refer_hospital")  # type: ignore[arg-type]
    consumer.drain()
    reports = [o for o in _objects(env) if o.kind == "consult-sr"]
    assert [(o.version, o.category) for o in reports] == [(1, "consult-results"), (2, "consult-results")]
    path = env.data_dir / reports[1].file_path
    assert dciodvfy(path) == []
    text = dsrdump(path)
    assert "Tràn dịch màng phổi, chuyển viện." in text and '"Refer to hospital"' in text
    predecessor = pydicom.dcmread(path).PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == reports[0].sop_instance_uid
    events = _stored_events(env)
    assert [e.category for e in events].count("consult-results") == 4


def test_an_unreadable_source_is_logged_and_skipped_not_a_stuck_consumer(
    env: WebEnv, shared_dicom: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other_study, other_sop = store_dicom(env, shared_dicom / "dev_02_cr_ap_mono1_implicit.dcm", "STATION1")
    assert triage_all(env) == 1
    with env.db.read_session() as session:
        lost = session.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == env.sop))  # type: ignore[attr-defined]
    (env.data_dir / lost).unlink()  # the first image's file is gone (restored from a bad backup, say)
    consumer = _consumer(env)
    with caplog.at_level("ERROR", logger="xray_triage.results.producer"):
        consumer.drain()
    assert any(env.sop in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)  # type: ignore[attr-defined]
    assert "/" not in caplog.records[0].getMessage().split("cannot be read")[1]  # no server path in the message
    assert sorted(o.kind for o in _objects(env)) == ["ai-gsps", "ai-sr"]  # the other image's, filed
    assert {o.sop_instance_uid for o in _objects(env)} == {e.sop_instance_uid for e in _stored_events(env)}
    consumer.stop()  # writes the position past the ResultObjectStored events it skipped without a write
    with env.db.read_session() as session:
        assert outbox.cursor(session, producer.CONSUMER) == outbox.latest_id(session) == consumer.position
        study_ids = set(session.scalars(select(ResultObject.study_id)))
        assert study_ids == {session.scalar(select(Study.id).where(Study.study_instance_uid == other_study))}
    assert other_sop


def test_ai_objects_are_made_before_the_write_transaction_that_records_them(env: WebEnv) -> None:
    """Issue 17: the SR + GSPS are built and written ahead (``AiResultsAhead``); the write lock is
    only taken to record their rows, so the gateway's commits do not wait for highdicom."""
    from sqlalchemy import event as sa_event

    config = producer.ResultsConfig(env.data_dir, load_card(env.model_dir), ROOT, clock=lambda: NOW)
    ahead = producer.AiResultsAhead(env.db, config)
    consumer = OutboxConsumer(
        env.db,
        producer.CONSUMER,
        lambda session, stored: producer.handle(session, stored, config, ahead),
        wants=producer.wants,
        batch=1,
        prepare=ahead.prepare,
    )
    study_dir = env.data_dir / "dicom" / env.study  # type: ignore[attr-defined]
    files_at_begin: list[int] = []

    def on_begin(_conn) -> None:  # type: ignore[no-untyped-def]
        files_at_begin.append(len(list(study_dir.rglob("*.dcm"))))

    sa_event.listen(env.db.engine, "begin", on_begin)
    try:
        assert consumer.drain() > 0
    finally:
        sa_event.remove(env.db.engine, "begin", on_begin)
    objects = _objects(env)
    assert [(o.kind, o.version) for o in objects] == [("ai-sr", 1), ("ai-gsps", 1)]
    assert files_at_begin and files_at_begin[0] == 3, files_at_begin  # the image + both objects, before the lock
    for row in objects:
        assert dciodvfy(env.data_dir / row.file_path) == []
    assert [e.sop_instance_uid for e in _stored_events(env)] == [o.sop_instance_uid for o in objects]
    # Handled again (as after a crash before the cursor's commit): nothing new, made ahead or not.
    with env.db.session() as session:
        session.execute(update(OutboxCursor).where(OutboxCursor.consumer == producer.CONSUMER).values(last_id=0))
    consumer._position = 0
    consumer.drain()
    assert [o.sop_instance_uid for o in _objects(env)] == [o.sop_instance_uid for o in objects]
