"""PACS destinations on ``/healthz`` and ``/admin``: queue counts, last error and success, degraded state."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from web_helpers import WebEnv, add_user_row, client_for, make_web_env, store_dicom

from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.store import deliveries
from xray_triage.store.delivery_schema import Destination
from xray_triage.store.destinations import DestinationSpec, add_destination
from xray_triage.store.schema import utcnow

DX = "dev_01_dx_pa_explicit_window.dcm"


def _env_with_failing_destination(tmp_path: Path, shared_dicom: Path, failing_for_s: float) -> WebEnv:
    env = make_web_env(tmp_path, destination_failing_degraded_s=600)
    with env.db.session() as session:
        add_destination(session, DestinationSpec("pacs", "ORTHANC", "127.0.0.1", 4242, ("images",)))
    store_dicom(env, shared_dicom / DX, "STATION1")
    OutboxConsumer(env.db, "delivery", deliveries.enqueue).drain()
    now = utcnow()
    with env.db.session() as session:
        [row] = deliveries.due(session, session.scalar(select(Destination.id)), now, 10)
        deliveries.mark_failed(session, row.delivery_id, "peer answered C-STORE status 0xA700", now, initial_s=5, max_s=60)
        destination = session.scalar(select(Destination))
        destination.failing_since = now - timedelta(seconds=failing_for_s)
    return env


def test_healthz_lists_destinations_and_is_degraded_when_one_fails_too_long(tmp_path: Path, shared_dicom: Path) -> None:
    env = _env_with_failing_destination(tmp_path / "a", shared_dicom, failing_for_s=30)
    client, _ = client_for(env)
    response = client.get("/healthz")
    assert response.status_code == 200, response.text
    [pacs] = response.json()["destinations"]
    assert (pacs["name"], pacs["state"], pacs["queued"], pacs["failed"], pacs["sent"]) == ("pacs", "failing", 1, 1, 0)
    assert "0xA700" in pacs["last_error"]

    env = _env_with_failing_destination(tmp_path / "b", shared_dicom, failing_for_s=3600)
    client, _ = client_for(env)
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded" and body["destinations_degraded"] == ["pacs"]


def test_admin_page_shows_each_destination_in_both_languages(tmp_path: Path, shared_dicom: Path) -> None:
    env = _env_with_failing_destination(tmp_path, shared_dicom, failing_for_s=3600)
    add_user_row(env, "boss", "admin", language="en")
    add_user_row(env, "sep", "admin", language="vi")
    client, _ = client_for(env, "boss")
    page = client.get("/admin").text
    assert 'data-destination="pacs"' in page and "PACS destinations" in page
    assert "ORTHANC @ 127.0.0.1:4242" in page and "failing for too long" in page
    assert '<td class="queued">1</td>' in page and '<td class="failed">1</td>' in page
    assert "0xA700" in page
    client, _ = client_for(env, "sep")
    page = client.get("/admin").text
    assert "Nơi nhận PACS" in page and "lỗi quá lâu" in page
