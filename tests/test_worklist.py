"""Worklist order (AI priority, then consult status, then longest waiting) and its filters."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from web_helpers import WebEnv, add_station_row, add_user_row, client_for, make_web_env, store_dicom

from xray_triage.store.consult_schema import Consult, User
from xray_triage.store.schema import PRIORITY_RANK, Instance, Series, Study, TriageResult

ROWS = re.compile(r'<tr class="priority-[a-z]+" data-study-uid="([^"]+)"')


def _set(env: WebEnv, uid: str, priority: str | None, received: datetime, flagged: tuple[str, ...] = ()) -> None:
    """Give a stored study a known priority, arrival time and flagged findings."""
    with env.db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=uid).one()
        study.priority, study.priority_rank, study.received_at = priority, PRIORITY_RANK[priority], received
        study.ai_status = "done" if priority else "pending"
        instance = session.query(Instance).join(Series).filter(Series.study_id == study.id).one()
        instance.ai_status = study.ai_status
        if priority:
            session.add(
                TriageResult(
                    instance_id=instance.id, model_version="fixture@1", probabilities={k: 0.9 for k in flagged},
                    thresholds={"Effusion": 0.5, "Edema": 0.5}, flagged=list(flagged), abnormal_score=0.9,
                    priority=priority, timings_ms={}, heatmaps={},
                )  # fmt: skip
            )


def _consult(env: WebEnv, uid: str, status: str) -> None:
    with env.db.session() as session:
        study = session.query(Study).filter_by(study_instance_uid=uid).one()
        requester = session.query(User).filter_by(username="st1").one()
        session.add(Consult(study_id=study.id, requested_by_id=requester.id, question="?", status=status))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("worklist"))
    add_station_row(env, "STATION1")
    add_station_row(env, "STATION2")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    now = datetime.now(UTC)
    source = shared_dicom / "dev_07_dx_pa_utf8_name.dcm"
    plan = [  # name, station, priority, hours ago, consult status, flagged
        ("normal_old", "STATION1", "normal", 30, None, ()),
        ("urgent_new", "STATION2", "urgent", 1, None, ("Effusion",)),
        ("urgent_old", "STATION1", "urgent", 5, None, ("Effusion",)),
        ("urgent_requested", "STATION1", "urgent", 0.5, "requested", ("Edema",)),
        ("urgent_closed", "STATION2", "urgent", 48, "closed", ("Edema",)),
        ("abnormal", "STATION2", "abnormal", 2, "answered", ("Edema",)),
        ("pending", "STATION1", None, 0.1, None, ()),
    ]
    env.uids = {}  # type: ignore[attr-defined]
    for name, station, priority, hours, consult, flagged in plan:
        uid, _ = store_dicom(env, source, station)
        _set(env, uid, priority, now - timedelta(hours=hours), flagged)
        if consult:
            _consult(env, uid, consult)
        env.uids[name] = uid  # type: ignore[attr-defined]
    return env


def _order(env: WebEnv, user: str, query: str = "") -> list[str]:
    client, _ = client_for(env, user)
    names = {uid: name for name, uid in env.uids.items()}  # type: ignore[attr-defined]
    page = client.get(f"/worklist/rows{query}")
    assert page.status_code == 200, page.text
    return [names[uid] for uid in ROWS.findall(page.text)]


def test_order_priority_then_consult_status_then_longest_waiting(env: WebEnv) -> None:
    assert _order(env, "spec") == [
        "urgent_requested",  # urgent with an open request comes first
        "urgent_old",  # then urgent without consult, longest waiting first
        "urgent_new",
        "urgent_closed",  # a closed consult sinks to the end of its priority
        "abnormal",
        "normal_old",
        "pending",  # not triaged yet
    ]


def test_station_user_sees_only_its_station_in_the_same_order(env: WebEnv) -> None:
    assert _order(env, "st1") == ["urgent_requested", "urgent_old", "normal_old", "pending"]
    assert _order(env, "st1", "?station=STATION2") == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?station=STATION2", ["urgent_new", "urgent_closed", "abnormal"]),
        ("?status=requested", ["urgent_requested"]),
        ("?status=none", ["urgent_old", "urgent_new", "normal_old", "pending"]),
        ("?status=closed", ["urgent_closed"]),
        ("?ai=pending", ["pending"]),
        ("?finding=Edema", ["urgent_requested", "urgent_closed", "abnormal"]),
        ("?finding=Effusion&station=STATION1", ["urgent_old"]),
    ],
)
def test_filters(env: WebEnv, query: str, expected: list[str]) -> None:
    assert _order(env, "spec", query) == expected


def test_date_filter_uses_the_users_day(env: WebEnv) -> None:
    today = datetime.now(UTC).astimezone(ZoneInfo("Asia/Ho_Chi_Minh")).date()
    rows = _order(env, "spec", f"?date_from={today - timedelta(days=3)}&date_to={today - timedelta(days=1)}")
    assert "urgent_closed" in rows and "pending" not in rows
    assert "urgent_closed" not in _order(env, "spec", f"?date_from={today}")


def test_worklist_shows_findings_and_diacritics(env: WebEnv) -> None:
    client, _ = client_for(env, "spec")
    page = client.get("/worklist").text
    assert "Nguyễn Thị Hồng" in page and "Edema 90%" in page
    assert 'option value="Edema"' in page  # the finding filter offers the model's labels
