"""``/metrics`` (issue 15, item 5): the Prometheus exposition, read back with prometheus_client's parser.

Real SQLite, the real ingest and worker code with the tiny model, a consult made
and answered through the web app; the metrics' clock is injected, so latencies
are exact numbers, not measurements of this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from web_helpers import WebEnv, add_station_row, add_user_row, client_for, store_dicom, triage_all

from consult_web.app import create_app
from xray_triage.metrics import Metrics
from xray_triage.settings import Settings
from xray_triage.store.consult_schema import Consult
from xray_triage.store.db import open_database
from xray_triage.store.delivery_schema import Delivery
from xray_triage.store.schema import Instance, TriageJob, utcnow
from xray_triage.store.users import create_api_token

STATION = "TYT_METRICS"
GOOD = "dev_06_dx_pa_j2k_lossless.dcm"
JPEG_LS = "dev_04_cr_pa_rescale_jpegls.dcm"


class FakeClock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> Any:
        return self.now


@pytest.fixture
def env(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[WebEnv, FakeClock]]:
    settings = Settings(data_dir=tmp_path / "data")
    db = open_database(settings)
    clock = FakeClock()
    from xray_triage.inference.card import load_card

    app = create_app(db, load_card(tiny_model), {}, settings, metrics=Metrics(db, clock=clock).attach())
    web = WebEnv(app, db, settings, tiny_model)
    add_station_row(web, STATION, "Metrics station")
    add_user_row(web, "admin1", "admin")
    add_user_row(web, "doctor", "station", STATION)
    add_user_row(web, "expert", "specialist")
    yield web, clock
    db.dispose()


def scrape(client: TestClient, token: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted label pairs -> value}, for every sample of the exposition."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_metrics_after_images_triage_and_a_consult(env: tuple[WebEnv, FakeClock], shared_dicom: Path) -> None:
    web, clock = env
    with web.db.session() as session:
        token = create_api_token(session, "admin1", "prometheus")
    scraper = TestClient(web.app, base_url="http://testserver")

    study_uid, _ = store_dicom(web, shared_dicom / GOOD, STATION)
    store_dicom(web, shared_dicom / GOOD, STATION)
    # A JPEG-LS image whose header says 2000 rows but whose stream is 1024: triage fails for good.
    store_dicom(web, shared_dicom / JPEG_LS, STATION, Rows=2000)
    with web.db.read_session() as session:
        oldest_job = session.scalar(select(TriageJob.created_at).order_by(TriageJob.created_at))
        received = {row.id: row.received_at for row in session.execute(select(Instance.id, Instance.received_at))}
    clock.now = oldest_job + timedelta(seconds=90)
    before = scrape(scraper, token)
    assert value(before, "xray_triage_images_received_total", station=STATION) == 3
    assert value(before, "xray_triage_triage_queue_depth", state="queued") == 3
    assert value(before, "xray_triage_triage_queue_oldest_age_seconds") == pytest.approx(90)
    assert value(before, "xray_triage_database_up") == 1

    clock.now = max(received.values()) + timedelta(seconds=2)  # every image "triaged" 2-3 s after it arrived
    assert triage_all(web) >= 3
    after = scrape(scraper, token)
    assert value(after, "xray_triage_triage_queue_depth", state="queued") == 0
    assert value(after, "xray_triage_triage_queue_oldest_age_seconds") == 0
    assert value(after, "xray_triage_triage_job_failures_total", station=STATION) == 1
    assert sum(after["xray_triage_triage_completed_total"].values()) == 2
    assert value(after, "xray_triage_triage_latency_seconds_count") == 2
    expected = sum((clock.now - r).total_seconds() for r in sorted(received.values())[:2])
    assert value(after, "xray_triage_triage_latency_seconds_sum") == pytest.approx(expected, abs=1.5)
    assert value(after, "xray_triage_triage_latency_seconds_bucket", le="1.0") == 0
    assert value(after, "xray_triage_triage_latency_seconds_bucket", le="5.0") == 2

    doctor, doctor_csrf = client_for(web, "doctor")
    asked = doctor.post(
        f"/studies/{study_uid}/consults",
        data={"question": "Tràn dịch màng phổi?", "urgency": "urgent", "csrf_token": doctor_csrf},
        follow_redirects=False,
    )
    assert asked.status_code == 303, asked.text[:500]
    with web.db.read_session() as session:
        consult_id, requested_at = session.execute(select(Consult.id, Consult.created_at)).one()
    clock.now = requested_at + timedelta(minutes=50)
    expert, expert_csrf = client_for(web, "expert")
    for path, data in ((f"/consults/{consult_id}/claim", {}), (f"/consults/{consult_id}/conclusion", {"conclusion": "refer_hospital"})):
        answer = expert.post(path, data={**data, "csrf_token": expert_csrf}, follow_redirects=False)
        assert answer.status_code == 303, (path, answer.status_code, answer.text[:500])
    final = scrape(scraper, token)
    assert value(final, "xray_triage_consult_turnaround_seconds_count", urgency="urgent") == 1
    assert value(final, "xray_triage_consult_turnaround_seconds_sum", urgency="urgent") == pytest.approx(3000)
    assert value(final, "xray_triage_consult_turnaround_seconds_bucket", urgency="urgent", le="1800.0") == 0
    assert value(final, "xray_triage_consult_turnaround_seconds_bucket", urgency="urgent", le="3600.0") == 1
    labels = {k for series in final.values() for pairs in series for k, _ in pairs}
    assert labels <= {"station", "state", "priority", "urgency", "le"}, labels  # never patient data


def test_metrics_need_an_admin(env: tuple[WebEnv, FakeClock]) -> None:
    web, _ = env
    with web.db.session() as session:
        expert_token = create_api_token(session, "expert")
    client = TestClient(web.app, base_url="http://testserver")
    anonymous = client.get("/metrics", follow_redirects=False)
    assert anonymous.status_code == 401 and anonymous.headers.get("www-authenticate") == "Bearer", anonymous.text
    specialist = client.get("/metrics", headers={"Authorization": f"Bearer {expert_token}"})
    assert specialist.status_code == 403, specialist.text[:300]
    logged_in, _ = client_for(web, "admin1")  # a browser login of an admin works too
    assert logged_in.get("/metrics").status_code == 200


def test_destination_backlog_is_read_from_the_delivery_queue(env: tuple[WebEnv, FakeClock], shared_dicom: Path) -> None:
    """Deliveries queued the way the delivery consumer queues them (outbox -> enqueue), none sent."""
    from xray_triage.store import outbox
    from xray_triage.store.deliveries import enqueue, mark_sent
    from xray_triage.store.destinations import DestinationSpec, add_destination

    web, clock = env
    with web.db.session() as session:
        token = create_api_token(session, "admin1")
        add_destination(session, DestinationSpec("pacs", "PACS", "10.0.0.5", 104, ("images",)))
        add_destination(session, DestinationSpec("idle", "IDLE", "10.0.0.6", 104, ("consult-results",)))
    for _ in range(3):
        store_dicom(web, shared_dicom / GOOD, STATION)
    with web.db.session() as session:
        events, _ = outbox.read_after(session, 0)
        queued = sum(enqueue(session, stored) for stored in events)
    assert queued == 3
    with web.db.session() as session:
        first = session.execute(select(Delivery.id, Delivery.created_at).order_by(Delivery.id)).first()
        mark_sent(session, first.id, 0, utcnow())
        oldest_pending = session.scalar(select(Delivery.created_at).where(Delivery.state == "pending").order_by(Delivery.created_at))
    clock.now = oldest_pending + timedelta(seconds=600)
    scraped = scrape(TestClient(web.app, base_url="http://testserver"), token)
    assert value(scraped, "xray_triage_destination_backlog", destination="pacs") == 2
    assert value(scraped, "xray_triage_destination_backlog", destination="idle") == 0
    assert value(scraped, "xray_triage_destination_backlog_oldest_age_seconds", destination="pacs") == pytest.approx(600)
    assert value(scraped, "xray_triage_destination_backlog_oldest_age_seconds", destination="idle") == 0
