"""Helpers for the web tests: an app on a temporary database, users, logins, stored studies.

Studies are stored through the real ``Ingestor`` (the gateway's code path) from
the shared DICOM files, and triaged by the real worker code with the tiny test
model, so pages show real rows, files and results; only the network hop of
DICOM is skipped (the end-to-end tests use dcmtk for that).
"""

from __future__ import annotations

import io
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from db_helpers import db_env
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from consult_web.app import create_app
from xray_triage.inference.card import load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.settings import Settings
from xray_triage.store.db import Database, open_database
from xray_triage.store.ingest import Ingestor, TriagePolicy
from xray_triage.store.stations import add_station
from xray_triage.store.users import add_user
from xray_triage.triage.worker import TriageWorkers

PASSWORD = "correct-horse-battery-staple"
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')
LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]*)"')


@dataclass
class WebEnv:
    app: FastAPI
    db: Database
    settings: Settings
    model_dir: Path | None

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir


# The per-test PostgreSQL database (XRAY_TRIAGE_DATABASE_URL) belongs to the first data directory
# a test makes an app on; on SQLite every data directory has its own file anyway.
_TEST_DATABASE_OWNER: dict[str, Path] = {}


def make_web_env(tmp_path: Path, model_dir: Path | None = None, **overrides: Any) -> WebEnv:
    """A web app on a fresh database (SQLite under ``tmp_path``, or PostgreSQL: tests/db_helpers.py);
    ``model_dir`` is the card's model."""
    data_dir = tmp_path / "data"
    test_url = os.environ.get("XRAY_TRIAGE_DATABASE_URL")
    if "database_url" not in overrides and (
        not test_url or _TEST_DATABASE_OWNER.setdefault(test_url, data_dir.resolve()) != data_dir.resolve()
    ):
        # A module-scoped fixture runs before the per-test database is set, and a test may make a
        # second app on another data directory: each gets a database of its own (as on SQLite).
        url = db_env(data_dir).get("XRAY_TRIAGE_DATABASE_URL")
        if url is not None:
            overrides["database_url"] = url
    settings = Settings(data_dir=data_dir, **overrides)
    db = open_database(settings)
    card = load_card(model_dir) if model_dir is not None else None
    return WebEnv(create_app(db, card, {}, settings), db, settings, model_dir)


def add_station_row(env: WebEnv, ae_title: str, name: str = "") -> None:
    with env.db.session() as session:
        add_station(session, ae_title, name)


def add_user_row(
    env: WebEnv, username: str, role: str, station: str | None = None, *, language: str = "en", password: str = PASSWORD
) -> None:
    with env.db.session() as session:
        add_user(session, username, password, role, station_ae=station, language=language)


def store_dicom(
    env: WebEnv,
    path: Path,
    station_ae: str,
    *,
    new_uids: bool = True,
    **tags: Any,
) -> tuple[str, str]:
    """Store a DICOM file as if ``station_ae`` had sent it; returns (study UID, SOP instance UID).

    ``new_uids`` gives the copy fresh Study/Series/SOP UIDs so one file can make many
    studies; ``tags`` overrides header values (e.g. ``PatientName="<b>x</b>"``).
    """
    ds = pydicom.dcmread(path)
    if new_uids:
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    ingestor = Ingestor(env.data_dir, env.db, TriagePolicy(env.settings.triage_modalities, env.settings.triage_body_parts))
    outcome = ingestor.ingest(
        ds,
        buffer.getvalue(),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        calling_ae=station_ae,
        peer_address="127.0.0.1",
    )
    assert outcome.ok, outcome
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def triage_all(env: WebEnv) -> int:
    """Run the real worker code on every queued job with the env's model; returns how many ran."""
    assert env.model_dir is not None, "make_web_env(..., model_dir=...) is needed to triage"
    runner = ModelRunner(load_card(env.model_dir))
    workers = TriageWorkers(env.db, runner, env.data_dir, count=0)
    done = 0
    try:
        while workers.run_one("test"):
            done += 1
    finally:
        runner.close()
    return done


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log in through the real form; returns the session's CSRF token."""
    page = client.get("/login")
    token = LOGIN_CSRF.search(page.text)
    assert token, page.text[:500]
    response = client.post(
        "/login",
        data={"username": username, "password": password, "login_csrf": token.group(1), "next": "/worklist"},
        follow_redirects=False,
    )
    assert response.status_code == 303, (response.status_code, response.text[:500])
    return csrf_of(client)


def csrf_of(client: TestClient) -> str:
    page = client.get("/worklist")
    match = CSRF_META.search(page.text)
    assert match and match.group(1), page.text[:500]
    return match.group(1)


def client_for(env: WebEnv, username: str | None = None) -> tuple[TestClient, str]:
    """A TestClient, logged in as ``username`` when given; returns (client, csrf token)."""
    client = TestClient(env.app, base_url="http://testserver")
    csrf = login(client, username) if username else ""
    return client, csrf


@contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """``app`` on a real uvicorn server in a thread, on a free 127.0.0.1 port; yields its base URL.

    For what the test client cannot do (long-lived streams, concurrent connections) while the
    test still reaches ``app.state`` (hooks, counters). Startup is waited for with bounded polling.
    """
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    app.state.stopping = lambda: server.should_exit  # open streams end when the server stops
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition: Any, what: str, deadline_s: float = 30.0) -> None:
    """Bounded polling for a condition another thread makes true (never a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
