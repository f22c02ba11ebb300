"""DICOM TLS pieces without a server process: the station-certificate rule, the TLS context, settings.

Real SQLite; certificates made here (tests/tls_certs.py). The handshake, the
refusals and the binding over the network are in tests/e2e/test_dicom_tls_e2e.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from tls_certs import CertAuthority

from dicom_gateway.tls import TlsConfig, TlsConfigError, server_context
from xray_triage.settings import SettingsError, load_settings
from xray_triage.store.db import Database
from xray_triage.store.station_certs import (
    PeerCertificate,
    check_certificate,
    normalise_fingerprint,
    pin_certificate,
    pinned_fingerprints,
)
from xray_triage.store.stations import StationError, add_station

SHA_A = "ab" * 32
SHA_B = "cd" * 32


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'test.db'}")
    database.create_schema()
    with database.session() as session:
        add_station(session, "STATION1", "one")
        add_station(session, "PINNED", "pinned")
        pin_certificate(session, "PINNED", ":".join(SHA_A[i : i + 2].upper() for i in range(0, 64, 2)))
    yield database
    database.dispose()


def test_fingerprints_are_normalised_and_checked() -> None:
    assert normalise_fingerprint("AB:" * 31 + "AB") == SHA_A
    for bad in ("", "ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(StationError):
            normalise_fingerprint(bad)


def test_pinning_twice_keeps_one_row(db: Database) -> None:
    with db.session() as session:
        pin_certificate(session, "PINNED", SHA_A)
        assert pinned_fingerprints(session, "PINNED") == {SHA_A}


@pytest.mark.parametrize(
    ("calling_ae", "over_tls", "peer", "allowed"),
    [
        ("STATION1", False, None, True),  # plain port, no pin: as before
        ("STATION1", True, None, True),  # TLS without a client certificate (optional): as on the plain port
        ("STATION1", True, PeerCertificate(SHA_B, "STATION1"), True),  # CN = AE title
        ("STATION1", True, PeerCertificate(SHA_B, "STATION2"), False),  # another station's certificate
        ("STATION1", True, PeerCertificate(SHA_B, None), False),  # no CN
        ("PINNED", True, PeerCertificate(SHA_A, "anything"), True),  # the pinned certificate, whatever its CN
        ("PINNED", True, PeerCertificate(SHA_B, "PINNED"), False),  # CN matches but it is not the pinned one
        ("PINNED", True, None, False),  # pinned, no certificate
        ("PINNED", False, None, False),  # pinned station on the plain port
        ("UNKNOWN", True, PeerCertificate(SHA_B, "UNKNOWN"), True),  # accept_unknown_stations decides elsewhere
    ],
)
def test_certificate_rule(db: Database, calling_ae: str, over_tls: bool, peer: PeerCertificate | None, allowed: bool) -> None:
    with db.read_session() as session:
        problem = check_certificate(session, calling_ae, over_tls=over_tls, peer=peer)
    assert (problem is None) == allowed, problem


def test_tls_context_requires_client_certificates_of_the_ca(tmp_path: Path) -> None:
    ca = CertAuthority("ca", tmp_path)
    server = ca.issue("localhost", server=True)
    required = server_context(TlsConfig(0, server.cert, server.key, ca.cert, require_client_cert=True))
    optional = server_context(TlsConfig(0, server.cert, server.key, ca.cert, require_client_cert=False))
    none = server_context(TlsConfig(0, server.cert, server.key, None, require_client_cert=False))
    assert (required.verify_mode, optional.verify_mode, none.verify_mode) == (
        ssl.CERT_REQUIRED,
        ssl.CERT_OPTIONAL,
        ssl.CERT_NONE,
    )
    assert required.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls_configuration_errors_name_the_file(tmp_path: Path) -> None:
    ca = CertAuthority("ca", tmp_path)
    server = ca.issue("localhost", server=True)
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsConfigError, match="missing.pem"):
        server_context(TlsConfig(0, missing, server.key, None, require_client_cert=False))
    with pytest.raises(TlsConfigError, match="CA file .*missing.pem"):
        server_context(TlsConfig(0, server.cert, server.key, missing, require_client_cert=True))
    other = ca.issue("other", server=True)
    with pytest.raises(TlsConfigError, match="cannot load the DICOM TLS certificate"):
        server_context(TlsConfig(0, server.cert, other.key, None, require_client_cert=False))  # key of another cert
    with pytest.raises(TlsConfigError, match="needs dicom_tls_ca_file"):
        server_context(TlsConfig(0, server.cert, server.key, None, require_client_cert=True))


def test_tls_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAY_TRIAGE_DICOM_TLS_PORT", "2762")
    with pytest.raises(SettingsError, match="dicom_tls_port needs dicom_tls_cert_file"):
        load_settings()
    monkeypatch.delenv("XRAY_TRIAGE_DICOM_TLS_PORT")
    monkeypatch.setenv("XRAY_TRIAGE_DICOM_PLAIN_ENABLED", "false")
    with pytest.raises(SettingsError, match="needs dicom_tls_port"):
        load_settings()
    monkeypatch.setenv("XRAY_TRIAGE_DICOM_TLS_PORT", "2762")
    monkeypatch.setenv("XRAY_TRIAGE_DICOM_TLS_CERT_FILE", "/etc/xray-triage/server.crt")
    monkeypatch.setenv("XRAY_TRIAGE_DICOM_TLS_KEY_FILE", "/etc/xray-triage/server.key")
    settings = load_settings()
    assert (settings.dicom_tls_port, settings.dicom_plain_enabled, settings.dicom_tls_require_client_cert) == (2762, False, True)


def test_tls_only_gateway_with_a_pynetdicom_scu(db: Database, tmp_path: Path) -> None:
    """``dicom_plain_enabled = false``: only the TLS listener is bound; pynetdicom's SCU (``tls_args``)
    with STATION1's certificate is accepted, the pinned station's AE title with it is rejected."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_gateway.scp import DicomGateway, GatewayConfig
    from xray_triage.store.ingest import Ingestor, TriagePolicy

    ca = CertAuthority("ca", tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    station = ca.issue("STATION1")
    config = GatewayConfig(
        ae_title="XRAY_TRIAGE", host="127.0.0.1", port=0, accept_unknown_stations=False, max_associations=4,
        acse_timeout_s=5, dimse_timeout_s=5, network_timeout_s=5, max_pdu=0, max_associations_per_station=2,
        reserved_station_associations=1, association_request_timeout_s=2,
        tls=TlsConfig(0, server.cert, server.key, ca.cert, require_client_cert=True), plain_enabled=False,
    )  # fmt: skip
    gateway = DicomGateway(config, db, Ingestor(tmp_path / "data", db, TriagePolicy(["CR", "DX"], ["CHEST"])))
    gateway.start()
    try:
        assert set(gateway._server.by_kind) == {"tls"}  # type: ignore[union-attr]
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.cert))
        client.load_cert_chain(str(station.cert), str(station.key))
        results = {}
        for calling in ("STATION1", "PINNED"):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", gateway.tls_port, ae_title="XRAY_TRIAGE", tls_args=(client, "localhost"))
            results[calling] = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
        assert results == {"STATION1": True, "PINNED": False}
    finally:
        gateway.stop(0.5)


def test_tls_port_in_use_fails_start_and_frees_the_plain_port(db: Database, tmp_path: Path) -> None:
    """Both listeners or none: a busy TLS port raises at start and the plain port bound first is released."""
    import socket

    from dicom_gateway.scp import DicomGateway, GatewayConfig
    from xray_triage.store.ingest import Ingestor, TriagePolicy

    ca = CertAuthority("ca", tmp_path / "pki")
    server = ca.issue("localhost", server=True)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    plain_port = probe.getsockname()[1]
    probe.close()
    try:
        config = GatewayConfig(
            ae_title="XRAY_TRIAGE", host="127.0.0.1", port=plain_port, accept_unknown_stations=False,
            max_associations=4, acse_timeout_s=5, dimse_timeout_s=5, network_timeout_s=5, max_pdu=0,
            reserved_station_associations=1,
            tls=TlsConfig(busy.getsockname()[1], server.cert, server.key, None, require_client_cert=False),
        )  # fmt: skip
        gateway = DicomGateway(config, db, Ingestor(tmp_path / "data", db, TriagePolicy(["CR"], ["CHEST"])))
        with pytest.raises(OSError):
            gateway.start()
        again = socket.socket()
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", plain_port))  # the plain listener was closed
        again.close()
    finally:
        busy.close()
