"""Domain events and the durable outbox (``xray_triage/events.py``, ``xray_triage/store/outbox.py``).

Real SQLite databases and the real writers (ingest, triage worker, consult rules, the
annotation API); the in-process handlers are plain functions that record what they get.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from sqlalchemy import select, text
from web_helpers import (
    WebEnv,
    add_station_row,
    add_user_row,
    client_for,
    make_web_env,
    store_dicom,
    triage_all,
)

from consult_web.routes.live import Change, ChangeFeed, LivePoller
from xray_triage.consults import rules
from xray_triage.events import (
    ConsultAnswered,
    ConsultClaimed,
    ConsultClosed,
    ConsultRequested,
    Event,
    EventHandlers,
    InstanceQuarantined,
    InstanceStored,
    ReplyPosted,
    TriageCompleted,
    UnknownEvent,
    decode,
)
from xray_triage.settings import Settings
from xray_triage.store import outbox
from xray_triage.store.consult_schema import Consult, User
from xray_triage.store.db import open_database
from xray_triage.store.outbox import OutboxEvent
from xray_triage.store.schema import Study
from xray_triage.store.users import AuthUser

DEV_07 = "dev_07_dx_pa_utf8_name.dcm"


@pytest.fixture
def env(tmp_path: Path, tiny_model: Path) -> WebEnv:
    env = make_web_env(tmp_path, model_dir=tiny_model)
    add_station_row(env, "STATION1")
    add_station_row(env, "STATION2")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    return env


def _auth(env: WebEnv, username: str) -> AuthUser:
    with env.db.read_session() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return AuthUser(user.id, user.username, "", user.role, user.station_ae, "en", "UTC")


def _study(session, uid: str) -> Study:  # type: ignore[no-untyped-def]
    return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def _events(env: WebEnv, study_uid: str | None = None) -> list[Event]:
    with env.db.read_session() as session:
        stored, _ = outbox.read_after(session, 0)
    return [s.event for s in stored if study_uid is None or s.event.study_uid == study_uid]


def test_an_event_commits_with_its_change_and_a_rolled_back_change_leaves_none(
    env: WebEnv, shared_dicom: Path
) -> None:
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    station = _auth(env, "st1")
    seen: list[tuple[Event, int]] = []

    def handler(event: Event) -> None:  # after the commit: the row is already visible to other readers
        with env.db.read_session() as session:
            seen.append((event, session.query(OutboxEvent).filter(OutboxEvent.type == event.type).count()))

    env.db.events.register(Event, handler)
    with pytest.raises(RuntimeError), env.db.session() as session:
        rules.request_consult(session, station, _study(session, uid), "ho kéo dài?", "urgent")
        raise RuntimeError("the request fails after the rule ran")
    assert [e for e in _events(env, uid) if isinstance(e, ConsultRequested)] == []
    assert seen == []  # nothing dispatched for a rolled-back transaction
    with env.db.read_session() as session:
        assert session.query(Consult).count() == 0

    with env.db.session() as session:
        consult = rules.request_consult(session, station, _study(session, uid), "ho kéo dài?", "urgent")
    expected = ConsultRequested(uid, "STATION1", consult_id=consult.id, urgency="urgent")
    assert _events(env, uid)[-1] == expected
    assert seen == [(expected, 1)]


def test_events_are_stored_in_order_typed_and_json(env: WebEnv, shared_dicom: Path) -> None:
    """A study's life from arrival to a closed consult, read back in order as the same typed events."""
    uid, sop = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    assert triage_all(env) == 1
    station, specialist = _auth(env, "st1"), _auth(env, "spec")
    with env.db.session() as session:
        consult = rules.request_consult(session, station, _study(session, uid), "?", "routine")
    with env.db.session() as session:
        consult = session.get(Consult, consult.id)
        rules.claim(session, specialist, consult)
        message = rules.reply(session, specialist, consult, "không thấy tổn thương")
        rules.conclude(session, specialist, consult, "normal")
        rules.close(session, station, consult)
        rules.close(session, station, consult)  # already closed: nothing changes, nothing raised
    events = _events(env, uid)
    assert [type(e) for e in events] == [
        InstanceStored,
        TriageCompleted,
        ConsultRequested,
        ConsultClaimed,
        ReplyPosted,
        ConsultAnswered,
        ConsultClosed,
    ]
    stored, triaged = events[0], events[1]
    assert isinstance(stored, InstanceStored) and stored.sop_instance_uid == sop and stored.triage_queued
    assert isinstance(triaged, TriageCompleted) and triaged.instance_id == stored.instance_id
    assert triaged.priority in ("urgent", "abnormal", "normal") and isinstance(triaged.flagged, tuple)
    assert events[4] == ReplyPosted(uid, "STATION1", consult.id, message.id, specialist.id, "answered")
    assert {e.station_ae for e in events} == {"STATION1"}
    # The payload is plain JSON in the table (what another process or language reads).
    with env.db.engine.connect() as conn:  # SQLite or PostgreSQL, as configured
        ids, types = zip(*conn.execute(text("SELECT id, type FROM outbox_events ORDER BY id")), strict=True)
        payload = tuple(conn.execute(select(outbox.OutboxEvent.payload["sop_instance_uid"].as_string())).first())
    assert list(ids) == sorted(ids) and types[:2] == ("instance.stored", "triage.completed")
    assert payload == (sop,)
    # Reading in pages gives the same events, and where to continue.
    with env.db.read_session() as session:
        first, position = outbox.read_after(session, 0, limit=3)
        rest, end = outbox.read_after(session, position, limit=100)
        assert outbox.read_after(session, end) == ([], end)
    assert [s.event for s in first + rest] == events and end == ids[-1]


def test_a_quarantined_copy_is_announced_and_a_duplicate_is_not(env: WebEnv, shared_dicom: Path) -> None:
    uid, sop = store_dicom(env, shared_dicom / DEV_07, "STATION1", new_uids=False)
    before = len(_events(env))
    store_dicom(env, shared_dicom / DEV_07, "STATION1", new_uids=False)
    assert len(_events(env)) == before  # an identical re-send: nothing new
    store_dicom(env, shared_dicom / DEV_07, "STATION2", new_uids=False)  # the same image from another station
    (quarantined,) = _events(env)[before:]
    assert isinstance(quarantined, InstanceQuarantined)
    assert (quarantined.station_ae, quarantined.sop_instance_uid) == ("STATION2", sop)


def test_consumers_claim_at_least_once_each_with_its_own_cursor(env: WebEnv, shared_dicom: Path) -> None:
    for _ in range(3):
        store_dicom(env, shared_dicom / DEV_07, "STATION1")
    with env.db.session() as session:
        batch, last = outbox.claim(session, "exporter", limit=2)
        outbox.advance(session, "exporter", last)
    assert len(batch) == 2
    with pytest.raises(RuntimeError), env.db.session() as session:  # a consumer that fails mid-way ...
        again, last = outbox.claim(session, "exporter", limit=10)
        outbox.advance(session, "exporter", last)
        raise RuntimeError("export target down")
    with env.db.session() as session:  # ... gets the same events again: its cursor did not move
        retried, last = outbox.claim(session, "exporter", limit=10)
        outbox.advance(session, "exporter", last)
    assert [s.id for s in retried] == [s.id for s in again] and len(retried) == 1
    with env.db.session() as session:
        assert outbox.claim(session, "exporter") == ([], last)
        notifier, _ = outbox.claim(session, "notifier")  # another consumer starts from the beginning
        assert [s.id for s in notifier] == [s.id for s in batch + retried]
        assert outbox.cursor(session, "exporter") == last and outbox.cursor(session, "notifier") == 0


def test_an_unknown_event_type_is_skipped_but_read_past(env: WebEnv, shared_dicom: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with env.db.session() as session:
        session.add(OutboxEvent(type="from.a.newer.version", study_uid="1.2", station_ae="X", payload={}))
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    with caplog.at_level(logging.WARNING), env.db.read_session() as session:
        events, last = outbox.read_after(session, 0)
    assert [e.event.study_uid for e in events] == [uid] and last == events[0].id
    assert "outbox event skipped" in caplog.text
    with pytest.raises(UnknownEvent):
        decode("from.a.newer.version", {})
    with pytest.raises(UnknownEvent):
        decode(ConsultClosed.type, {"study_uid": "1.2"})  # fields missing


def test_handlers_registry_filters_by_class_and_survives_a_failing_handler(caplog) -> None:  # type: ignore[no-untyped-def]
    every: list[Event] = []
    closed: list[Event] = []
    handlers = EventHandlers([(Event, every.append)])

    @handlers.on(ConsultClosed)
    def on_closed(event: ConsultClosed) -> None:
        closed.append(event)

    def broken(event: Event) -> None:
        raise ValueError("handler bug")

    unregister = handlers.register(Event, broken)
    events = [ConsultRequested("1.2", "CR1", 1, "routine"), ConsultClosed("1.2", "CR1", 1)]
    with caplog.at_level(logging.ERROR):
        handlers.dispatch(events)
    assert every == events and closed == events[1:]
    assert caplog.text.count("event handler failed") == 2
    unregister()
    caplog.clear()
    handlers.dispatch(events[:1])
    assert every == [*events, events[0]] and "event handler failed" not in caplog.text


def test_event_types_are_unique_and_stable() -> None:
    with pytest.raises(TypeError, match="used twice"):

        class Again(Event):  # noqa: F841 - the definition itself must fail
            type = ConsultClosed.type

    assert decode(TriageCompleted.type, TriageCompleted("1", "A", "2", 3, "normal", ("Effusion",)).payload()) == (
        TriageCompleted("1", "A", "2", 3, "normal", ("Effusion",))
    )


def test_a_database_from_before_the_outbox_gains_its_tables(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    db = open_database(settings)
    with db.engine.begin() as conn:  # as an unversioned build from before the outbox left it
        conn.execute(text("DROP TABLE outbox_events"))
        conn.execute(text("DROP TABLE outbox_cursors"))
        conn.execute(text("DROP TABLE alembic_version"))
    db.upgrade_schema()  # `xray-triage db upgrade`: the baseline migration adds what is missing
    db.dispose()
    db = open_database(settings)
    try:
        with db.session() as session:
            assert outbox.latest_id(session) == 0 and outbox.cursor(session, "x") == 0
    finally:
        db.dispose()


def test_a_commit_in_this_process_wakes_the_live_poller(env: WebEnv, shared_dicom: Path) -> None:
    """With an hour between polls, the change still arrives: the after-commit handler woke the poller."""
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    station = _auth(env, "st1")

    async def scenario() -> Change:
        poller = LivePoller(env.db, interval_s=3600.0, min_gap_s=0.01)
        subscriber = poller.subscribe(_auth(env, "spec"))
        for _ in range(3000):  # bounded: until the poller knows where the outbox ends
            if poller.feed is not None:
                break
            await asyncio.sleep(0.01)

        def request() -> None:
            with env.db.session() as session:
                rules.request_consult(session, station, _study(session, uid), "?", "routine")

        await asyncio.to_thread(request)
        try:
            return await asyncio.wait_for(subscriber.queue.get(), timeout=60)
        finally:
            poller.unsubscribe(subscriber)

    assert asyncio.run(scenario()) == Change("consult.request", uid, "STATION1")


def test_annotation_changes_reach_the_live_feed(env: WebEnv, shared_dicom: Path) -> None:
    from consult_web.routes.live import ChangeFeed

    uid, sop = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    feed = ChangeFeed(env.db)
    client, csrf = client_for(env, "spec")
    created = client.post(
        f"/api/studies/{uid}/annotations",
        json={"instance_uid": sop, "kind": "text", "geometry": {"x": 5.0, "y": 5.0}, "label": "A"},
        headers={"X-CSRF-Token": csrf},
    )
    assert created.status_code == 201, created.text
    mark = created.json()["id"]
    assert client.patch(f"/api/annotations/{mark}", json={"label": "B"}, headers={"X-CSRF-Token": csrf}).is_success
    assert client.delete(f"/api/annotations/{mark}", headers={"X-CSRF-Token": csrf}).status_code == 204
    kinds = [c.kind for c in feed.poll()]
    assert kinds == ["annotation.create", "annotation.update", "annotation.delete"]


def test_the_live_feed_reads_events_not_the_audit_log(env: WebEnv, shared_dicom: Path) -> None:
    from consult_web.audit import audit
    from consult_web.routes.live import ChangeFeed

    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    feed = ChangeFeed(env.db)
    specialist, station = _auth(env, "spec"), _auth(env, "st1")
    with env.db.session() as session:  # an audit row alone is no change
        audit(session, specialist, "consult.claim", study_uid=uid, consult_id=1)
    assert feed.poll() == []
    with env.db.session() as session:  # a change made through the rules, by any writer (no audit row)
        rules.request_consult(session, station, _study(session, uid), "?", "routine")
    assert feed.poll() == [Change("consult.request", uid, "STATION1")]


def test_outbox_consumer_handles_each_event_once_in_order_and_a_failure_repeats_the_batch(
    env: WebEnv, shared_dicom: Path
) -> None:
    from xray_triage.outbox_consumer import OutboxConsumer

    seen: list[int] = []
    failing = {"on": True}

    def handle(session, stored) -> None:  # type: ignore[no-untyped-def]
        seen.append(stored.id)
        if failing["on"] and len(seen) == 2:
            raise RuntimeError("peer down")

    consumer = OutboxConsumer(env.db, "test-consumer", handle, batch=10)
    assert consumer.run_once() == 0  # an empty outbox: nothing, and no cursor row written
    for _ in range(2):
        store_dicom(env, shared_dicom / DEV_07, "STATION1")
    with pytest.raises(RuntimeError):
        consumer.run_once()
    with env.db.read_session() as session:
        assert outbox.cursor(session, "test-consumer") == 0  # the failed batch did not move the cursor
    failing["on"] = False
    assert consumer.drain() == 2
    first, second = seen[:2]
    assert seen == [first, second, first, second] and first < second
    assert consumer.run_once() == 0
    with env.db.read_session() as session:
        assert outbox.cursor(session, "test-consumer") == second


def test_the_live_feed_sees_what_another_process_commits(env: WebEnv) -> None:
    """Several `serve` processes (roles): a worker process's TriageCompleted reaches this web process."""
    import subprocess

    from e2e_helpers import python_command

    feed = ChangeFeed(env.db)
    script = (
        "import sys\n"
        "from xray_triage.events import TriageCompleted\n"
        "from xray_triage.store import outbox\n"
        "from xray_triage.store.db import Database\n"
        "db = Database(sys.argv[1])\n"
        "with db.session() as session:\n"
        "    outbox.record(session, TriageCompleted('1.2.3', 'STATION1', '1.2.3.4', 7, 'urgent', ('Effusion',)))\n"
        "db.dispose()\n"
    )
    done = subprocess.run(
        [python_command(), "-c", script, env.settings.resolved_database_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert feed.poll() == [Change("study", "1.2.3", "STATION1")]


def test_concurrent_writers_never_make_the_live_feed_skip_an_event(env: WebEnv) -> None:
    """Ids follow commit order (the one SQLite writer; the table lock of ``outbox.record`` on
    PostgreSQL), so a reader that remembers "up to id N" while others commit misses nothing."""
    import threading

    from xray_triage.events import TriageCompleted

    feed = ChangeFeed(env.db)
    writers, per_writer = 4, 25
    seen: list[Change] = []

    def write(n: int) -> None:
        for k in range(per_writer):
            with env.db.session() as session:
                outbox.record(session, TriageCompleted(f"1.{n}.{k}", "STATION1", f"1.{n}.{k}.1", k, "normal", ()))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        seen.extend(feed.poll())
    for thread in threads:
        thread.join()
    seen.extend(feed.poll())
    assert sorted(c.study_uid for c in seen) == sorted(f"1.{n}.{k}" for n in range(writers) for k in range(per_writer))
