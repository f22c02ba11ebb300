"""DICOM over TLS for the gateway (PS3.15 B.1, "The Basic TLS Secure Transport Connection Profile").

The server side's :class:`ssl.SSLContext` (certificate, key, the CA that signs the
stations' client certificates) and what the gateway reads from an authenticated
peer. The handshake itself runs in the connection's own thread under the pending
gate's deadline (:meth:`dicom_gateway.connections.PendingGate.tls_handshake`),
never in the accept loop, so a slow or garbage client holds no association slot
and stalls no other connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from xray_triage.store.station_certs import PeerCertificate, fingerprint_of_der


@dataclass(frozen=True)
class TlsConfig:
    port: int
    cert_file: Path  # PEM: the server certificate (chain)
    key_file: Path  # PEM: its private key
    ca_file: Path | None  # PEM: CA(s) whose client certificates are trusted; None = no client certificates
    require_client_cert: bool


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used; the message names the file, not its contents."""


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer (PS3.15 B.1 allows TLS 1.2/1.3 with the BCP 195 ciphers: Python's defaults).

    With a CA file, client certificates are asked for (``CERT_OPTIONAL``) and verified
    against it; ``require_client_cert`` makes them mandatory (``CERT_REQUIRED``): a peer
    without one, or with one of another CA, fails the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load the DICOM TLS certificate {config.cert_file} with key {config.key_file}: {_why(exc)}"
        ) from exc
    if config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load the DICOM TLS CA file {config.ca_file}: {_why(exc)}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    elif config.require_client_cert:
        raise TlsConfigError(
            "dicom_tls_require_client_cert needs dicom_tls_ca_file (the CA of the stations' certificates)"
        )
    return context


def peer_certificate(sock: object) -> PeerCertificate | None:
    """The verified client certificate of a TLS socket (None: no certificate, or not TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        der = sock.getpeercert(binary_form=True)
        info = sock.getpeercert() or {}
    except (ValueError, OSError):  # closed meanwhile
        return None
    if not der:
        return None
    common_name = None
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                common_name = value
    return PeerCertificate(sha256=fingerprint_of_der(der), common_name=common_name)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
