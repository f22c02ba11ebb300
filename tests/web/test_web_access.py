"""Permission rules of the web view and the JSON API, through FastAPI's test client.

Every route needs a login (pages redirect, the API answers 401); a station user
never reaches another station's study, whatever URL it guesses; state-changing
requests need the session's CSRF token; roles are enforced; logins are rate
limited; disabled users lose their sessions and tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from web_helpers import (
    PASSWORD,
    WebEnv,
    add_station_row,
    add_user_row,
    client_for,
    login,
    make_web_env,
    store_dicom,
    triage_all,
)

from consult_web.routes.live import ChangeFeed, visible_changes
from xray_triage.store.consult_schema import AuditEvent, Consult
from xray_triage.store.users import create_api_token, set_disabled, user_for_session

PUBLIC = {"/login", "/healthz", "/login/language/{language}", "/"}
XSS = '<img src=x onerror="alert(1)">'
XSS_NAME = "<script>alert(1)</script>"  # no '=' or '^': they separate DICOM PN components


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("web"), model_dir=tiny_model)
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_station_row(env, "STATION2", "Trạm Y tế Cần Giờ")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "st2", "station", "STATION2")
    add_user_row(env, "spec", "specialist")
    add_user_row(env, "spec2", "specialist")
    add_user_row(env, "admin", "admin")
    env.study1, env.sop1 = store_dicom(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")  # type: ignore[attr-defined]
    env.study2, env.sop2 = store_dicom(  # type: ignore[attr-defined]
        env, shared_dicom / "dev_01_dx_pa_explicit_window.dcm", "STATION2", PatientName=XSS_NAME, PatientID="P-2"
    )
    triage_all(env)
    return env


def _fill(path: str, env: WebEnv) -> str:
    values = {"study_uid": env.study2, "sop_uid": env.sop2, "consult_id": "1", "id": "1", "annotation_id": "1"}  # type: ignore[attr-defined]
    return re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: values.get(m.group(1), "x"), path)


def test_every_route_needs_a_login(env: WebEnv) -> None:
    anonymous = TestClient(env.app)
    checked = 0
    for path, operations in env.app.openapi()["paths"].items():
        if path in PUBLIC:
            continue
        for method in operations:
            response = anonymous.request(method.upper(), _fill(path, env), follow_redirects=False)
            if path.startswith(("/api/", "/fhir/", "/dicomweb/")) or path == "/events":  # programs: 401, no redirect
                assert response.status_code == 401, (method, path, response.status_code)
            else:
                assert response.status_code == 303, (method, path, response.status_code)
                assert response.headers["location"].startswith("/login?next=")
            checked += 1
    assert checked >= 15
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/login").status_code == 200


def test_bearer_token_works_for_the_api_only(env: WebEnv) -> None:
    with env.db.session() as session:
        token = create_api_token(session, "st1")
    client = TestClient(env.app, headers={"Authorization": f"Bearer {token}"})
    studies = client.get("/api/studies").json()["studies"]
    assert [s["study_uid"] for s in studies] == [env.study1]  # type: ignore[attr-defined]
    assert client.get(f"/api/studies/{env.study2}").status_code == 404  # type: ignore[attr-defined]
    assert client.get("/worklist", follow_redirects=False).status_code == 303  # not a browser session
    bad = TestClient(env.app, headers={"Authorization": "Bearer xrt_not-a-token"})
    assert bad.get("/api/studies").status_code == 401


def test_station_user_cannot_reach_another_stations_study(env: WebEnv) -> None:
    client, csrf = client_for(env, "st1")
    other, sop = env.study2, env.sop2  # type: ignore[attr-defined]
    worklist = client.get("/worklist").text
    assert env.study1 in worklist and other not in worklist  # type: ignore[attr-defined]
    for path in (
        f"/studies/{other}",
        f"/studies/{other}/consult-panel",
        f"/api/studies/{other}",
        f"/api/studies/{other}/consults",
        f"/api/studies/{other}/annotations",
        f"/studies/{other}/images/{sop}/render",
        f"/api/studies/{other}/images/{sop}/windows",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code)
        assert "Trạm Y tế Cần Giờ" not in response.text and "P-2" not in response.text
    response = client.post(
        f"/studies/{other}/consults", data={"question": "?", "urgency": "routine", "csrf_token": csrf}
    )
    assert response.status_code == 404
    response = client.post(
        f"/api/studies/{other}/annotations",
        json={"instance_uid": sop, "kind": "rect", "geometry": {"x": 1, "y": 1, "w": 5, "h": 5}},
        headers={"X-CSRF-Token": csrf},
    )
    assert response.status_code == 404
    assert [s["study_uid"] for s in client.get("/api/studies").json()["studies"]] == [env.study1]  # type: ignore[attr-defined]


def test_csrf_is_required_for_state_changes(env: WebEnv) -> None:
    client, csrf = client_for(env, "st1")
    url = f"/studies/{env.study1}/consults"  # type: ignore[attr-defined]
    form = {"question": "Sốt, ho 2 tuần?", "urgency": "routine"}
    assert client.post(url, data=form, follow_redirects=False).status_code == 403
    assert client.post(url, data={**form, "csrf_token": "wrong"}, follow_redirects=False).status_code == 403
    cross_site = client.post(
        url, data={**form, "csrf_token": csrf}, headers={"Origin": "http://evil.example"}, follow_redirects=False
    )
    assert cross_site.status_code == 403
    specialist, other_csrf = client_for(env, "spec")
    assert client.post(url, data={**form, "csrf_token": other_csrf}, follow_redirects=False).status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    ok = client.post(url, data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert ok.status_code == 303
    # clean up: close it so other tests start without an open consult
    cid = re.search(r'data-consult-id="(\d+)"', client.get(f"/studies/{env.study1}").text).group(1)  # type: ignore[union-attr,attr-defined]
    assert client.post(f"/consults/{cid}/close", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303


def test_roles(env: WebEnv) -> None:
    station, station_csrf = client_for(env, "st1")
    specialist, spec_csrf = client_for(env, "spec")
    assert specialist.get("/admin").status_code == 403
    assert station.get("/admin").status_code == 403
    admin, _ = client_for(env, "admin")
    assert admin.get("/admin").status_code == 200
    uid = env.study1  # type: ignore[attr-defined]
    form = {"question": "Tràn dịch màng phổi?", "urgency": "urgent"}
    # A specialist may open a consult on any study it sees (issue 16 item 7); it closes its own freely.
    other = env.study2  # type: ignore[attr-defined]
    assert specialist.post(f"/studies/{other}/consults", data={**form, "csrf_token": spec_csrf}).status_code == 200
    own = specialist.get(f"/api/studies/{other}/consults").json()["consults"][0]["id"]
    assert specialist.post(f"/consults/{own}/close", data={"csrf_token": spec_csrf}).status_code == 200
    assert station.post(f"/studies/{uid}/consults", data={**form, "csrf_token": station_csrf}).status_code == 200
    cid = re.search(r'data-consult-id="(\d+)"[^>]*data-status="requested"', station.get(f"/studies/{uid}").text)
    assert cid
    consult = cid.group(1)
    assert station.post(f"/consults/{consult}/claim", data={"csrf_token": station_csrf}).status_code == 403
    conclusion = {"conclusion": "normal", "csrf_token": station_csrf}
    assert station.post(f"/consults/{consult}/conclusion", data=conclusion).status_code == 403
    # The station's question is unanswered: closing it needs the specialist to say so (item 9).
    assert specialist.post(f"/consults/{consult}/close", data={"csrf_token": spec_csrf}).status_code == 409
    acknowledged = {"csrf_token": spec_csrf, "acknowledge_unanswered": "1"}
    assert specialist.post(f"/consults/{consult}/close", data=acknowledged).status_code == 200


def test_consult_lifecycle_and_escaping(env: WebEnv) -> None:
    station, station_csrf = client_for(env, "st1")
    specialist, spec_csrf = client_for(env, "spec")
    other, other_csrf = client_for(env, "spec2")
    uid = env.study1  # type: ignore[attr-defined]

    def status() -> str:
        consults = specialist.get(f"/api/studies/{uid}/consults").json()["consults"]
        return consults[0]["status"]

    station.post(f"/studies/{uid}/consults", data={"question": XSS, "urgency": "emergency", "csrf_token": station_csrf})
    assert status() == "requested"
    consult = specialist.get(f"/api/studies/{uid}/consults").json()["consults"][0]["id"]
    assert specialist.post(f"/consults/{consult}/claim", data={"csrf_token": spec_csrf}).status_code == 200
    assert status() == "in_review"
    assert other.post(f"/consults/{consult}/claim", data={"csrf_token": other_csrf}).status_code == 409
    reply = "Không thấy tràn khí màng phổi. " + XSS
    specialist.post(f"/consults/{consult}/messages", data={"body": reply, "csrf_token": spec_csrf})
    assert status() == "answered"
    station.post(f"/consults/{consult}/messages", data={"body": "Cần chụp lại không?", "csrf_token": station_csrf})
    assert status() == "in_review"
    specialist.post(f"/consults/{consult}/conclusion", data={"conclusion": "refer_hospital", "csrf_token": spec_csrf})
    assert status() == "answered"
    panel = station.get(f"/studies/{uid}/consult-panel").text
    assert XSS not in panel and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in panel
    assert "Không thấy tràn khí màng phổi." in panel and "Refer to hospital" in panel
    api = station.get(f"/api/studies/{uid}/consults").json()["consults"][0]
    assert api["messages"][0]["body"] == reply and api["conclusion"] == "refer_hospital"
    station.post(f"/consults/{consult}/close", data={"csrf_token": station_csrf})
    assert status() == "closed"
    assert station.post(f"/consults/{consult}/messages", data={"body": "x", "csrf_token": station_csrf}).status_code == 409
    empty = station.post(f"/studies/{uid}/consults", data={"question": "   ", "csrf_token": station_csrf})
    assert empty.status_code == 400 and "Traceback" not in empty.text


def test_dicom_patient_name_is_escaped_everywhere(env: WebEnv) -> None:
    specialist, _ = client_for(env, "spec")
    for path in ("/worklist", "/worklist/rows", f"/studies/{env.study2}"):  # type: ignore[attr-defined]
        page = specialist.get(path).text
        assert XSS_NAME not in page, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
    assert specialist.get(f"/api/studies/{env.study2}").json()["patient_name"] == XSS_NAME  # type: ignore[attr-defined]


def test_login_rate_limit(env: WebEnv) -> None:
    client = TestClient(env.app)
    for _ in range(5):
        page = client.get("/login").text
        token = re.search(r'name="login_csrf" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
        failed = client.post("/login", data={"username": "spec2", "password": "wrong-password", "login_csrf": token})
        assert failed.status_code == 401
    page = client.get("/login").text
    token = re.search(r'name="login_csrf" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
    locked = client.post("/login", data={"username": "spec2", "password": PASSWORD, "login_csrf": token})
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    env.app.state.limiter.reset()  # other tests log in from this "IP" (the test client's) too
    with env.db.session() as session:
        assert session.query(AuditEvent).filter(AuditEvent.action == "login.failed").count() >= 5


def test_login_form_needs_its_cookie_and_next_stays_local(env: WebEnv) -> None:
    client = TestClient(env.app)
    response = client.post("/login", data={"username": "spec", "password": PASSWORD, "login_csrf": "forged"})
    assert response.status_code == 403
    page = client.get("/login?next=https://evil.example/x").text
    token = re.search(r'name="login_csrf" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
    response = client.post(
        "/login",
        data={"username": "spec", "password": PASSWORD, "login_csrf": token, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/worklist"
    from consult_web.routes.login import _safe_next

    assert _safe_next("/\\evil.example") == "/worklist"
    assert _safe_next("/studies/1.2.3?x=1") == "/studies/1.2.3?x=1"


def test_session_cookie_flags(env: WebEnv) -> None:
    for base, secure in (("http://testserver", False), ("https://testserver", True)):
        client = TestClient(env.app, base_url=base)
        page = client.get("/login").text
        token = re.search(r'name="login_csrf" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
        response = client.post(
            "/login", data={"username": "spec", "password": PASSWORD, "login_csrf": token}, follow_redirects=False
        )
        cookie = next(v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith("xrt_session="))
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie
        assert ("Secure" in cookie) is secure, cookie


def test_disabled_user_loses_sessions_and_tokens(env: WebEnv) -> None:
    add_user_row(env, "temp", "specialist")
    client, _ = client_for(env, "temp")
    with env.db.session() as session:
        token = create_api_token(session, "temp")
    cookie = client.cookies.get("xrt_session")
    assert client.get("/worklist").status_code == 200
    with env.db.session() as session:
        set_disabled(session, "temp")
    with env.db.session() as session:
        assert user_for_session(session, cookie) is None
    assert client.get("/worklist", follow_redirects=False).status_code == 303
    assert TestClient(env.app, headers={"Authorization": f"Bearer {token}"}).get("/api/studies").status_code == 401
    fresh = TestClient(env.app)
    page = fresh.get("/login").text
    token_field = re.search(r'name="login_csrf" value="([^"]*)"', page).group(1)  # type: ignore[union-attr]
    assert fresh.post("/login", data={"username": "temp", "password": PASSWORD, "login_csrf": token_field}).status_code == 401


def test_audit_log_records_views(env: WebEnv) -> None:
    client, _ = client_for(env, "spec2")
    client.get(f"/studies/{env.study2}")  # type: ignore[attr-defined]
    with env.db.session() as session:
        events = session.query(AuditEvent).filter(AuditEvent.username == "spec2", AuditEvent.action == "study.view").all()
        assert any(e.study_uid == env.study2 for e in events)  # type: ignore[attr-defined]


def test_live_changes_respect_station_visibility(env: WebEnv, shared_dicom: Path) -> None:
    from xray_triage.store.users import AuthUser

    def auth(username: str, role: str, station: str | None) -> AuthUser:
        return AuthUser(0, username, "", role, station, "en", "Asia/Ho_Chi_Minh")

    station, specialist = auth("st1", "station", "STATION1"), auth("spec", "specialist", None)
    feed = ChangeFeed(env.db)
    uid2, _ = store_dicom(env, shared_dicom / "dev_05_dx_ap_rle.dcm", "STATION2")
    uid1, _ = store_dicom(env, shared_dicom / "dev_03_dx_pa_jpeg_lossless_sv1.dcm", "STATION1")
    changes = feed.poll()
    seen_by_station = {c.study_uid for c in visible_changes(station, changes)}
    seen_by_specialist = {c.study_uid for c in visible_changes(specialist, changes)}
    assert uid1 in seen_by_station and uid2 not in seen_by_station
    assert {uid1, uid2} <= seen_by_specialist
    assert feed.poll() == []  # nothing new since
    client, csrf = client_for(env, "st1")
    client.post(f"/studies/{uid1}/consults", data={"question": "?", "urgency": "routine", "csrf_token": csrf})
    assert {"kind": "consult.request", "study_uid": uid1} in [c.event() for c in visible_changes(specialist, feed.poll())]
    # A specialist's answer (a reply that answers, a conclusion) is marked for the station's notice; its own reply is not.
    with env.db.session() as session:
        consult_id = session.query(Consult.id).order_by(Consult.id.desc()).limit(1).scalar()
    client.post(f"/consults/{consult_id}/messages", data={"body": "thêm: sốt 39", "csrf_token": csrf})
    assert [c.event() for c in visible_changes(station, feed.poll())] == [{"kind": "consult.reply", "study_uid": uid1}]
    spec_client, spec_csrf = client_for(env, "spec")
    spec_client.post(f"/consults/{consult_id}/claim", data={"csrf_token": spec_csrf})
    spec_client.post(f"/consults/{consult_id}/messages", data={"body": "Tràn dịch", "csrf_token": spec_csrf})
    spec_client.post(f"/consults/{consult_id}/conclusion", data={"conclusion": "refer_hospital", "csrf_token": spec_csrf})
    seen = [c.event() for c in visible_changes(station, feed.poll())]
    assert {"kind": "consult.claim", "study_uid": uid1} in seen
    assert {"kind": "consult.reply", "study_uid": uid1, "answer": True} in seen
    assert {"kind": "consult.conclude", "study_uid": uid1, "answer": True} in seen


def test_error_pages_are_clear_and_bodies_limited(env: WebEnv) -> None:
    client, csrf = client_for(env, "spec")
    missing = client.get("/studies/1.2.3.4.5")
    assert missing.status_code == 404 and "<html" in missing.text and "Traceback" not in missing.text
    assert client.get("/api/studies/1.2.3.4.5").json() == {"detail": "study not found"}
    huge = client.post(
        f"/studies/{env.study1}/consults",  # type: ignore[attr-defined]
        content=b"question=" + b"a" * 2_000_000,
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf},
    )
    assert huge.status_code == 413
    bad_date = client.get("/worklist?date_from=yesterday")
    assert bad_date.status_code == 400 and "date_from" in bad_date.text


def test_security_headers(env: WebEnv) -> None:
    client, _ = client_for(env, "spec")
    headers = client.get("/worklist").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    # Pages and the fragments live updates re-fetch name patients: never cached.
    assert headers["cache-control"] == "no-store"
    assert client.get("/worklist/rows").headers["cache-control"] == "no-store"
    assert client.get("/static/app.js").headers.get("cache-control") != "no-store"  # static files may be


def test_login_helper_roundtrip(env: WebEnv) -> None:
    client = TestClient(env.app)
    assert login(client, "admin")


def test_admin_manages_users_and_stations(env: WebEnv) -> None:
    admin, csrf = client_for(env, "admin")
    form = {"username": "bs.hoa", "password": PASSWORD, "role": "specialist", "csrf_token": csrf}
    assert admin.post("/admin/users", data={**form, "timezone": "Mars/Olympus"}).status_code == 400
    assert admin.post("/admin/users", data={**form, "timezone": "Europe/Paris", "language": "en"}).status_code == 200
    assert admin.post("/admin/users", data={**form, "timezone": "Europe/Paris"}).status_code == 400  # duplicate
    client, _ = client_for(env, "bs.hoa")
    assert client.get("/worklist").status_code == 200
    assert admin.post("/admin/users/bs.hoa/disabled", data={"disabled": "true", "csrf_token": csrf}).status_code == 200
    assert client.get("/worklist", follow_redirects=False).status_code == 303
    station = {"ae_title": "TYT_CANGIO_CR1", "name": "Trạm Y tế Cần Giờ", "csrf_token": csrf}
    assert admin.post("/admin/stations", data=station).status_code == 200
    assert "TYT_CANGIO_CR1" in admin.get("/admin").text
    assert admin.post("/admin/stations/TYT_CANGIO_CR1/remove", data={"csrf_token": csrf}).status_code == 200
    assert "TYT_CANGIO_CR1" not in admin.get("/admin").text


def test_strangers_on_twenty_addresses_cannot_lock_out_a_user_who_logged_in_before(env: WebEnv) -> None:
    """Through the login form: 20 failures from 20 addresses, then the real user from her own address."""

    def attempt(ip: str, password: str) -> int:
        client = TestClient(env.app, client=(ip, 50000))
        token = re.search(r'name="login_csrf" value="([^"]*)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        data = {"username": "spec2", "password": password, "login_csrf": token}
        return client.post("/login", data=data, follow_redirects=False).status_code

    env.app.state.limiter.reset()
    try:
        assert attempt("10.20.0.5", PASSWORD) == 303  # her usual network
        for n in range(20):
            assert attempt(f"198.51.100.{n}", "wrong-password") == 401
        assert attempt("10.20.0.5", PASSWORD) == 303  # not locked out of her own network
        assert attempt("198.51.100.200", "wrong-password") == 429  # a stranger's next address waits
    finally:
        env.app.state.limiter.reset()


def test_a_users_own_network_is_remembered_across_a_restart(env: WebEnv) -> None:
    """A new app on the same database (a restart) learns her networks from the audit log's logins."""
    from consult_web.app import create_app

    def attempt(app, ip: str, password: str) -> int:  # type: ignore[no-untyped-def]
        client = TestClient(app, client=(ip, 50000))
        token = re.search(r'name="login_csrf" value="([^"]*)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        data = {"username": "spec2", "password": password, "login_csrf": token}
        return client.post("/login", data=data, follow_redirects=False).status_code

    assert attempt(env.app, "2001:db8:77:1::5", PASSWORD) == 303  # she logs in from home, over IPv6
    restarted = create_app(env.db, None, {}, env.settings)
    for n in range(20):
        assert attempt(restarted, f"198.51.100.{n}", "wrong-password") == 401
    assert attempt(restarted, "2001:db8:77:1::9", PASSWORD) == 303  # same /64, after the restart
    assert attempt(restarted, "198.51.100.201", "wrong-password") == 429


def test_two_apps_on_one_database_share_the_login_limit(env: WebEnv) -> None:
    """Two web processes (two apps on one database): failed logins spread over both lock the name on both."""
    from consult_web.app import create_app

    def attempt(app, password: str) -> int:  # type: ignore[no-untyped-def]
        client = TestClient(app, client=("203.0.113.50", 50000))
        token = re.search(r'name="login_csrf" value="([^"]*)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        data = {"username": "spec", "password": password, "login_csrf": token}
        return client.post("/login", data=data, follow_redirects=False).status_code

    other = create_app(env.db, None, {}, env.settings)
    limit = env.settings.login_max_failures
    try:
        for n in range(limit):  # alternately through each process: neither sees the limit on its own
            assert attempt(env.app if n % 2 else other, "wrong-password") == 401
        assert attempt(env.app, PASSWORD) == 429
        assert attempt(other, PASSWORD) == 429
    finally:
        env.app.state.limiter.reset()
    assert attempt(other, PASSWORD) == 303


def test_healthz_is_json_when_degraded(env: WebEnv) -> None:
    client = TestClient(env.app)
    env.app.state.health["dicom_gateway"] = "stopping"
    try:
        response = client.get("/healthz")
    finally:
        env.app.state.health.pop("dicom_gateway")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded" and response.json()["dicom_gateway"] == "stopping"
    assert client.get("/healthz").json()["status"] == "ok"


def test_healthz_reports_free_disk_space_and_low_space_is_degraded(env: WebEnv) -> None:
    client = TestClient(env.app)
    body = client.get("/healthz").json()
    assert body["storage"] == "ok" and body["disk_free_mb"] > body["min_free_disk_mb"] == 512, body
    storage = env.app.state.storage
    storage.min_free_mb = body["disk_free_mb"] * 1000  # far above what is free
    try:
        response = client.get("/healthz")
        admin, _ = client_for(env, "admin")
        page = admin.get("/admin").text
    finally:
        storage.min_free_mb = 512
    assert response.status_code == 503, response.text
    assert response.json()["status"] == "degraded" and response.json()["storage"] == "degraded"
    assert 'id="storage-degraded"' in page
    assert client.get("/healthz").status_code == 200
