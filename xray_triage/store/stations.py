"""Registered stations (modalities) and the association-time admission check."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from xray_triage.store.schema import Station


class StationError(ValueError):
    """Bad station input (duplicate or invalid AE title, bad IP list)."""


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str  # for the log: why it was accepted or rejected
    calling_ae_unknown: bool = False  # rejected because the AE title is not registered
    registered: bool = True  # False: an unknown station let in by accept_unknown_stations


def normalise_ae_title(ae_title: str) -> str:
    value = ae_title.strip()
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.isprintable():
        raise StationError(f"invalid AE title {ae_title!r}: 1-16 printable ASCII characters, no backslash")
    return value


def parse_allowed_ips(spec: str | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``"10.0.0.5, 192.168.1.0/24"`` -> networks; empty or None -> no restriction."""
    if not spec:
        return []
    networks = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise StationError(f"invalid IP address or network {item!r}: {exc}") from exc
    return networks


def add_station(session: Session, ae_title: str, name: str, allowed_ips: str | None = None) -> Station:
    ae = normalise_ae_title(ae_title)
    parse_allowed_ips(allowed_ips)
    if session.scalar(select(Station).where(Station.ae_title == ae)):
        raise StationError(f"station {ae!r} is already registered")
    station = Station(ae_title=ae, name=name.strip(), allowed_ips=(allowed_ips or None))
    session.add(station)
    session.flush()
    return station


def remove_station(session: Session, ae_title: str) -> bool:
    station = session.scalar(select(Station).where(Station.ae_title == ae_title.strip()))
    if station is None:
        return False
    session.delete(station)
    return True


def list_stations(session: Session) -> list[Station]:
    return list(session.scalars(select(Station).order_by(Station.ae_title)))


def admit(session: Session, calling_ae: str, peer_ip: str, *, accept_unknown: bool) -> Admission:
    """Decide whether an association from ``calling_ae`` at ``peer_ip`` may proceed."""
    ae = calling_ae.strip()
    station = session.scalar(select(Station).where(Station.ae_title == ae))
    if station is None:
        if accept_unknown:
            return Admission(
                True, "unknown station accepted (accept_unknown_stations = true)", registered=False
            )
        return Admission(
            False, f"calling AE title {ae!r} is not a registered station", calling_ae_unknown=True
        )
    networks = parse_allowed_ips(station.allowed_ips)
    if networks:
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return Admission(False, f"station {ae!r}: peer address {peer_ip!r} is not an IP address")
        if not any(address in net for net in networks):
            return Admission(False, f"station {ae!r} may not connect from {peer_ip}")
    return Admission(True, f"station {ae!r} ({station.name})")
