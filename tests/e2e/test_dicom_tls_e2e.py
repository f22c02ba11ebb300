"""End to end: DICOM TLS on the gateway (issue 15, item 4) with dcmtk's TLS-enabled tools,
and the operators' metrics (item 5) after that real traffic.

One real ``xray-triage serve`` with a TLS port beside its plain one, client
certificates required; certificates are made in the test (tests/tls_certs.py).
A peer is refused at the handshake without a certificate or with one of another
CA, and at association time when its certificate does not belong to the calling
AE title it uses (CN = AE title, or a pinned SHA-256). A client that never
finishes its handshake, or speaks plain DICOM to the TLS port, is closed and
holds no slot. A second server delivers images to this one's TLS port through a
``--tls`` destination with a client certificate (branch ``delivery``). ``/metrics`` is read with prometheus_client's parser after an
image sent over TLS, its triage and a consult answered through the web app.
Waits are upper bounds, never expectations of speed.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tls_certs import CertAuthority, Issued

from e2e_helpers import (
    SHARED_DICOM,
    STATION1,
    Server,
    check_cli,
    copy_with_new_uids,
    create_users,
    dataset_bytes,
    echoscu,
    free_port,
    http,
    query,
    read_uids,
    scalar,
    store_ok,
    storescu,
    web_login,
)

pytestmark = pytest.mark.slow

SENDER = "SITE_A"  # the AE title of the second, sending server (a registered station here)
PINNED = "PINNED_DR1"  # a station pinned by fingerprint, whose certificate's CN is not its AE title
OTHER = "STATION2"  # registered, no pinned certificate
REQUEST_TIMEOUT_S = 2
CLOSE_DEADLINE_S = 30.0  # upper bound for the server to close a stalled connection
SMALL_FILE = SHARED_DICOM / "dev_06_dx_pa_j2k_lossless.dcm"
USERS = [
    ("metrics-admin", "admin", None, "metrics-admin-password"),
    ("doctor1", "station", STATION1, "doctor1-long-password"),
    ("expert1", "specialist", None, "expert1-long-password"),
]
TOKENS: dict[str, str] = {}  # user name -> API token, filled by the server fixture


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertAuthority("stations-ca", directory)
    rogue = CertAuthority("rogue-ca", directory)
    return {
        "ca": ca,
        "server": ca.issue("localhost", server=True),
        "station1": ca.issue(STATION1),
        "pinned": ca.issue("device-serial-4711"),
        "rogue_station1": rogue.issue(STATION1),
        "sender": ca.issue(SENDER),
    }


@pytest.fixture(scope="module")
def server(module_launcher: object, pki: dict[str, object]) -> Iterator[Server]:
    ca: CertAuthority = pki["ca"]  # type: ignore[assignment]
    srv: Issued = pki["server"]  # type: ignore[assignment]
    pinned: Issued = pki["pinned"]  # type: ignore[assignment]
    env = {
        "XRAY_TRIAGE_DICOM_TLS_PORT": str(free_port()),
        "XRAY_TRIAGE_DICOM_TLS_CERT_FILE": str(srv.cert),
        "XRAY_TRIAGE_DICOM_TLS_KEY_FILE": str(srv.key),
        "XRAY_TRIAGE_DICOM_TLS_CA_FILE": str(ca.cert),
        "XRAY_TRIAGE_DICOM_TLS_REQUIRE_CLIENT_CERT": "true",
        "XRAY_TRIAGE_ASSOCIATION_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "XRAY_TRIAGE_SHUTDOWN_GRACE_S": "1",
    }
    server = module_launcher.launch("tls", env=env, stations=[(OTHER, "Other station", None), (SENDER, "Site A server", None)], start=False)  # type: ignore[attr-defined]
    check_cli(
        "stations", "add", PINNED, "--name", "Pinned", "--tls-cert-fingerprint", pinned.sha256.upper(),
        "--data-dir", server.data_dir,
    )
    TOKENS.update(create_users(server.data_dir, USERS))
    server.start()
    yield server


def tls_port(server: Server) -> int:
    return int(server.env_extra["XRAY_TRIAGE_DICOM_TLS_PORT"])


def client(pki: dict[str, object], name: str) -> list[str]:
    """dcmtk options: authenticate with ``name``'s certificate, trust the stations' CA for the server."""
    issued: Issued = pki[name]  # type: ignore[assignment]
    ca: CertAuthority = pki["ca"]  # type: ignore[assignment]
    return [*issued.tls_flags, "+cf", str(ca.cert)]


def test_station_sends_over_tls_and_images_are_triaged(server: Server, pki: dict[str, object], tmp_path: Path) -> None:
    echo = echoscu(tls_port(server), tls=client(pki, "station1"))
    assert echo.returncode == 0, echo.describe() + "\n" + server.log_tail()
    (path,) = copy_with_new_uids([SMALL_FILE], tmp_path)
    uids = read_uids(path)
    store_ok([path], tls_port(server), tls=client(pki, "station1"))
    study = server.wait_final([uids.study])[uids.study]
    assert study["station"]["ae_title"] == STATION1 and study["ai_status"] == "done", study
    server.echo_ok()  # the plain port still works beside the TLS one


def test_no_certificate_or_another_ca_fails_the_handshake(server: Server, pki: dict[str, object], tmp_path: Path) -> None:
    ca: CertAuthority = pki["ca"]  # type: ignore[assignment]
    (path,) = copy_with_new_uids([SMALL_FILE], tmp_path)
    anonymous = storescu([path], tls_port(server), tls=["+tla", "+cf", str(ca.cert)])
    rogue = echoscu(tls_port(server), tls=client(pki, "rogue_station1"))
    for run in (anonymous, rogue):
        assert run.returncode != 0 and "Success" not in run.store_responses, run.describe()
    assert "TLS handshake failed" in server.log(), server.log_tail()
    sop = read_uids(path).sop
    assert scalar(server.data_dir, "SELECT count(*) FROM instances WHERE sop_instance_uid = ?", (sop,)) == 0


def test_certificate_must_belong_to_the_calling_ae_title(server: Server, pki: dict[str, object]) -> None:
    # STATION1's certificate (CN=STATION1) used with another registered AE title: rejected.
    borrowed = echoscu(tls_port(server), aet=OTHER, tls=client(pki, "station1"))
    assert borrowed.returncode != 0 and "Rejected" in borrowed.output, borrowed.describe()
    assert f"is not the calling AE title {OTHER!r}" in server.log(), server.log_tail()
    # A pinned station: its pinned certificate works although its CN is not the AE title...
    pinned = echoscu(tls_port(server), aet=PINNED, tls=client(pki, "pinned"))
    assert pinned.returncode == 0, pinned.describe() + "\n" + server.log_tail()
    # ... another valid certificate of the same CA does not ...
    wrong = echoscu(tls_port(server), aet=PINNED, tls=client(pki, "station1"))
    assert wrong.returncode != 0 and "Rejected" in wrong.output, wrong.describe()
    # ... and the plain port refuses its AE title.
    plain = echoscu(server.dicom_port, aet=PINNED)
    assert plain.returncode != 0 and "Rejected" in plain.output, plain.describe()
    assert "may not connect on the plain (non-TLS) port" in server.log(), server.log_tail()


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (True) or CLOSE_DEADLINE_S passes (False)."""
    deadline = time.monotonic() + CLOSE_DEADLINE_S
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_stalled_or_plain_clients_are_closed_and_hold_no_slot(server: Server, pki: dict[str, object], tmp_path: Path) -> None:
    port = tls_port(server)
    # Half a TLS record header, then silence: a handshake that never completes.
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"\x16\x03\x01")
    # Plain DICOM (an A-ASSOCIATE-RQ PDU header and some bytes) sent to the TLS port.
    plain = socket.create_connection(("127.0.0.1", port))
    plain.sendall(b"\x01\x00\x00\x00\x00\x44" + b"\x00" * 68)
    try:
        # While the stalled one is open, a station still gets through.
        (path,) = copy_with_new_uids([SMALL_FILE], tmp_path)
        store_ok([path], port, tls=client(pki, "station1"))
        assert _closed_by_server(plain), "the TLS port kept a plain-DICOM connection open"
        assert _closed_by_server(stalled), "the TLS port kept a stalled handshake open"
    finally:
        stalled.close()
        plain.close()
    # The server closes the connection, then logs why: wait for the line (bounded).
    deadline = time.monotonic() + 30
    while "TLS handshake not completed in time" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "TLS handshake not completed in time" in server.log(), server.log_tail()


def _scrape(server: Server, token: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    token = token or TOKENS["metrics-admin"]
    response = http.get(server.url("/metrics"), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text[:500]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _csrf(client: object, path: str) -> str:
    page = client.get(path)  # type: ignore[attr-defined]
    match = re.search(r'<meta name="csrf-token" content="([^"]*)">', page.text)
    assert page.status_code == 200 and match, page.text[:500]
    return match.group(1)


def test_metrics_after_tls_traffic_triage_and_a_consult(server: Server, pki: dict[str, object], tmp_path: Path) -> None:
    received = ("xray_triage_images_received_total", (("station", STATION1),))
    latency_count = ("xray_triage_triage_latency_seconds_count", ())
    turnaround = ("xray_triage_consult_turnaround_seconds_count", (("urgency", "emergency"),))
    before = _scrape(server)
    (path,) = copy_with_new_uids([SMALL_FILE], tmp_path)
    uids = read_uids(path)
    store_ok([path], tls_port(server), tls=client(pki, "station1"))
    server.wait_final([uids.study])

    passwords = {name: password for name, _, _, password in USERS}
    doctor = web_login(server.url(""), "doctor1", passwords["doctor1"])
    asked = doctor.post(
        f"/studies/{uids.study}/consults",
        data={"question": "Khó thở, sốt", "urgency": "emergency", "csrf_token": _csrf(doctor, f"/studies/{uids.study}")},
    )
    assert asked.status_code == 303, asked.text[:500]
    (consult_id,) = [r[0] for r in query(server.data_dir, "SELECT c.id FROM consults c JOIN studies s ON s.id = c.study_id WHERE s.study_instance_uid = ?", (uids.study,))]
    expert = web_login(server.url(""), "expert1", passwords["expert1"])
    csrf = _csrf(expert, f"/studies/{uids.study}")
    for action, data in (("claim", {}), ("conclusion", {"conclusion": "urgent_transfer"})):
        answer = expert.post(f"/consults/{consult_id}/{action}", data={**data, "csrf_token": csrf})
        assert answer.status_code == 303, (action, answer.status_code, answer.text[:500])

    after = _scrape(server)
    assert after[received] - before.get(received, 0) == 1, (before.get(received), after.get(received))
    assert after[latency_count] - before.get(latency_count, 0) == 1
    assert after[turnaround] - before.get(turnaround, 0) == 1
    assert after[("xray_triage_triage_queue_depth", (("state", "queued"),))] == 0
    assert after[("xray_triage_database_up", ())] == 1


def test_server_delivers_images_to_another_servers_tls_port(
    server: Server, module_launcher: object, pki: dict[str, object], tmp_path: Path
) -> None:
    ca: CertAuthority = pki["ca"]  # type: ignore[assignment]
    own: Issued = pki["sender"]  # type: ignore[assignment]
    sender = module_launcher.launch(  # type: ignore[attr-defined]
        "sender",
        env={
            "XRAY_TRIAGE_AE_TITLE": SENDER,
            "XRAY_TRIAGE_REQUIRE_CALLED_AE_TITLE": "false",  # the test's storescu/echoscu call it XRAY_TRIAGE
            "XRAY_TRIAGE_DELIVERY_TLS_CA_FILE": str(ca.cert),
            "XRAY_TRIAGE_DELIVERY_TLS_CERT_FILE": str(own.cert),
            "XRAY_TRIAGE_DELIVERY_TLS_KEY_FILE": str(own.key),
            "XRAY_TRIAGE_DELIVERY_RETRY_INITIAL_S": "0.5",
            "XRAY_TRIAGE_DELIVERY_RETRY_MAX_S": "2",
            "XRAY_TRIAGE_DELIVERY_POLL_S": "0.3",
            "XRAY_TRIAGE_DELIVERY_TIMEOUT_S": "10",
            "XRAY_TRIAGE_TRIAGE_WORKERS": "0",
        },
        start=False,
    )
    check_cli(
        "destinations", "add", "central", "--ae-title", "XRAY_TRIAGE", "--host", "127.0.0.1",
        "--port", str(tls_port(server)), "--send", "images", "--tls", "--data-dir", sender.data_dir,
    )  # fmt: skip
    sender_tokens = create_users(sender.data_dir, USERS[:1])
    sender.start()
    (path,) = copy_with_new_uids([SMALL_FILE], tmp_path)
    uids = read_uids(path)
    store_ok([path], sender.dicom_port)
    deadline = time.monotonic() + 120
    rows: list[object] = []
    while time.monotonic() < deadline and not rows:
        rows = query(server.data_dir, "SELECT calling_ae, file_path FROM instances WHERE sop_instance_uid = ?", (uids.sop,))
        time.sleep(0.2)
    assert rows, f"not delivered over TLS\n{sender.log_tail()}\n{server.log_tail()}"
    assert rows[0][0] == SENDER, rows
    assert dataset_bytes(server.data_dir / rows[0][1]) == dataset_bytes(path), "the data set changed on the way"
    sent = query(sender.data_dir, "SELECT state FROM deliveries WHERE sop_instance_uid = ?", (uids.sop,))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and [r[0] for r in sent] != ["sent"]:
        time.sleep(0.2)
        sent = query(sender.data_dir, "SELECT state FROM deliveries WHERE sop_instance_uid = ?", (uids.sop,))
    assert [r[0] for r in sent] == ["sent"], sent
    after = _scrape(sender, sender_tokens["metrics-admin"])
    assert after[("xray_triage_destination_backlog", (("destination", "central"),))] == 0, after
