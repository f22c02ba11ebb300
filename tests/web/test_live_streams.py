"""Live-update streams (``/events``) under abuse: per-login and per-user limits, one shared poller.

Against a real uvicorn server (``serve_app``) with real HTTP connections; the database
polls are counted through a SQLAlchemy hook on the real SQLite engines, never timed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event
from web_helpers import (
    WebEnv,
    add_station_row,
    add_user_row,
    login,
    make_web_env,
    serve_app,
    store_dicom,
    wait_until,
)

from xray_triage.store.consult_schema import User

PER_SESSION, PER_USER = 2, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path) -> WebEnv:
    env = make_web_env(
        tmp_path_factory.mktemp("live"),
        live_poll_s=0.05,
        live_max_streams_per_session=PER_SESSION,
        live_max_streams_per_user=PER_USER,
    )
    add_station_row(env, "STATION1")
    add_station_row(env, "STATION2")
    for name in ("spec", "spec2", "spec3", "spec4"):
        add_user_row(env, name, "specialist")
    add_user_row(env, "bs.vi", "specialist", language="vi")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "st1b", "station", "STATION1")
    store_dicom(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")
    return env


@pytest.fixture(scope="module")
def base_url(env: WebEnv) -> Iterator[str]:
    with serve_app(env.app) as url:
        yield url


def _client(base_url: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, trust_env=False, timeout=httpx.Timeout(30.0))
    login(client, username)  # type: ignore[arg-type]
    return client


LINES: dict[int, Iterator[str]] = {}  # one line iterator per open stream (dropping it would close the stream)


def _open(client: httpx.Client) -> httpx.Response:
    """Start a stream; a 200 is read up to its first line so the server holds it open."""
    response = client.send(client.build_request("GET", "/events"), stream=True)
    if response.status_code == 200:
        LINES[id(response)] = response.iter_lines()
        assert next(LINES[id(response)]) == "retry: 3000"
    else:
        response.read()
    return response


def _next_change(stream: httpx.Response) -> dict[str, str]:
    for line in LINES[id(stream)]:  # bounded by the client's read timeout
        if line.startswith("data: "):
            return json.loads(line[6:])
    raise AssertionError("stream ended")


def _user_id(env: WebEnv, username: str) -> int:
    with env.db.read_session() as session:
        return session.query(User).filter_by(username=username).one().id


def test_streams_beyond_the_limits_are_refused_and_others_keep_working(env: WebEnv, base_url: str) -> None:
    first, second, other = _client(base_url, "spec"), _client(base_url, "spec"), _client(base_url, "spec2")
    streams: list[httpx.Response] = []
    try:
        streams += [_open(first) for _ in range(PER_SESSION)]
        assert [s.status_code for s in streams] == [200] * PER_SESSION
        refused = _open(first)  # one login over its limit
        assert refused.status_code == 429
        assert f"from this login (at most {PER_SESSION})" in refused.text
        streams.append(_open(second))  # the same user's other login still has room ...
        assert streams[-1].status_code == 200
        refused = _open(second)  # ... until the user's limit over all logins
        assert refused.status_code == 429 and f"at most {PER_USER} over all your logins" in refused.text
        vietnamese = _client(base_url, "bs.vi")
        vietnamese_streams = [_open(vietnamese) for _ in range(PER_SESSION + 1)]
        assert "Quá nhiều kết nối cập nhật trực tiếp" in vietnamese_streams[-1].text  # the user's language
        for stream in vietnamese_streams:
            stream.close()
        # Another user is not affected: the worklist answers and their own stream opens.
        assert other.get("/worklist").status_code == 200
        streams.append(_open(other))
        assert streams[-1].status_code == 200
        # A closed stream gives its place back.
        spec_id = _user_id(env, "spec")
        streams.pop(0).close()
        wait_until(lambda: env.app.state.live.limits.open_streams(spec_id) == PER_USER - 1, "the closed stream's release")
        streams.append(_open(first))
        assert streams[-1].status_code == 200
    finally:
        for stream in streams:
            stream.close()
        for client in (first, second, other):
            client.close()


def test_one_database_poll_per_interval_whatever_the_number_of_streams(
    env: WebEnv, base_url: str, shared_dicom: Path
) -> None:
    poller = env.app.state.live.poller
    engines = {env.db.engine, env.db.read_engine}
    polls_issued = [0]

    def count(_conn, _cursor, statement: str, *_args: object) -> None:  # type: ignore[no-untyped-def]
        if "from outbox_events" in statement.lower():  # the one statement of every change poll
            polls_issued[0] += 1

    seen_at_poll: list[int] = []
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    poller.on_poll = lambda _changes: seen_at_poll.append(polls_issued[0])
    clients = [_client(base_url, name) for name in ("spec3", "spec4", "st1", "st1b")]
    streams: list[httpx.Response] = []
    try:
        streams = [_open(client) for client in clients for _ in range(2)]  # 8 streams of 4 users
        assert [s.status_code for s in streams] == [200] * 8
        wait_until(lambda: len(poller.subscribers) == 8, "8 subscribers")
        start = len(seen_at_poll)
        wait_until(lambda: len(seen_at_poll) >= start + 6, "6 polls")
        window = seen_at_poll[start : start + 6]
        assert [b - a for a, b in zip(window, window[1:], strict=False)] == [1] * 5  # one query per poll, not 8
        # Every stream still gets the changes its user may see.
        uid1, _ = store_dicom(env, shared_dicom / "dev_05_dx_ap_rle.dcm", "STATION2")
        uid2, _ = store_dicom(env, shared_dicom / "dev_03_dx_pa_jpeg_lossless_sv1.dcm", "STATION1")
        for stream in streams[:4]:  # the specialist's: both studies
            assert _next_change(stream)["study_uid"] == uid1
        for stream in streams[4:]:  # the station user's: only its own station's
            assert _next_change(stream)["study_uid"] == uid2
    finally:
        poller.on_poll = None
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
        for stream in streams:
            stream.close()
        for client in clients:
            client.close()
