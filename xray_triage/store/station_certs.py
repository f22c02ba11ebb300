"""Binding a station's calling AE title to its TLS client certificate.

AE titles are not secrets (PS3.8 7.1.1.6), so on the DICOM TLS port the gateway
checks that the certificate the peer authenticated with belongs to the station
whose calling AE title it uses:

* a station with pinned certificates (``xray-triage stations add ...
  --tls-cert-fingerprint SHA256``, table ``station_certificates``) must present
  one of them, by the SHA-256 of the DER certificate; it is refused on the plain
  port, so its AE title cannot be used there without the certificate;
* any other station's certificate must carry the AE title as its subject Common
  Name (CN = calling AE title, exactly);
* a peer without a certificate (possible only when client certificates are not
  required) is treated as on the plain port.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from xray_triage.store.schema import StationCertificate
from xray_triage.store.stations import StationError, normalise_ae_title

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PeerCertificate:
    """What the gateway knows of an authenticated TLS peer: certificate SHA-256 and subject CN."""

    sha256: str  # lower-case hex of the DER certificate
    common_name: str | None


def fingerprint_of_der(der: bytes) -> str:
    """SHA-256 of a DER certificate as lower-case hex (what ``openssl x509 -fingerprint -sha256`` prints)."""
    return hashlib.sha256(der).hexdigest()


def normalise_fingerprint(value: str) -> str:
    """``"AB:CD:..."`` or ``"abcd..."`` -> 64 lower-case hex digits; StationError otherwise."""
    hexed = value.strip().replace(":", "").lower()
    if not _HEX64.match(hexed):
        raise StationError(f"invalid SHA-256 fingerprint {value!r}: 64 hex digits, colons allowed")
    return hexed


def pin_certificate(session: Session, ae_title: str, fingerprint: str) -> StationCertificate:
    """Pin one certificate (by SHA-256) to a station; pinning it twice is a no-op."""
    ae = normalise_ae_title(ae_title)
    sha = normalise_fingerprint(fingerprint)
    row = session.scalar(
        select(StationCertificate).where(StationCertificate.ae_title == ae, StationCertificate.sha256 == sha)
    )
    if row is None:
        row = StationCertificate(ae_title=ae, sha256=sha)
        session.add(row)
        session.flush()
    return row


def pinned_fingerprints(session: Session, ae_title: str) -> set[str]:
    return set(
        session.scalars(
            select(StationCertificate.sha256).where(StationCertificate.ae_title == ae_title.strip())
        )
    )


def unpin_all(session: Session, ae_title: str) -> int:
    rows = list(
        session.scalars(select(StationCertificate).where(StationCertificate.ae_title == ae_title.strip()))
    )
    for row in rows:
        session.delete(row)
    return len(rows)


def check_certificate(
    session: Session, calling_ae: str, *, over_tls: bool, peer: PeerCertificate | None
) -> str | None:
    """None when ``calling_ae`` may use this connection, else the reason it may not (for the log)."""
    ae = calling_ae.strip()
    pinned = pinned_fingerprints(session, ae)
    if peer is None:
        if pinned:
            where = "without a client certificate" if over_tls else "on the plain (non-TLS) port"
            return f"station {ae!r} has a pinned TLS certificate and may not connect {where}"
        return None
    if pinned:
        if peer.sha256 in pinned:
            return None
        return f"the client certificate (sha256 {peer.sha256[:16]}...) is not one pinned to station {ae!r}"
    if peer.common_name == ae:
        return None
    return f"the client certificate's CN {peer.common_name!r} is not the calling AE title {ae!r}"
