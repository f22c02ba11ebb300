"""Destinations (PACS peers): add, list with their queue state, remove, retry now.

Used by ``xray-triage destinations ...``, the admin page, ``/healthz`` and the server's
start-up (``sync_configured`` for the TOML file's ``[[destinations]]`` tables). No network
here: the sender (``dicom_sender/``) does the C-STOREs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from xray_triage.store.delivery_schema import (
    CATEGORIES,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    SOURCE_CLI,
    SOURCE_CONFIG,
    Delivery,
    Destination,
)
from xray_triage.store.schema import utcnow
from xray_triage.store.stations import StationError, normalise_ae_title


class DestinationError(ValueError):
    """Bad destination input (duplicate name, invalid AE title, port or category); the message says which."""


@dataclass(frozen=True)
class DestinationSpec:
    """What defines a destination (from the CLI, the admin page or a TOML ``[[destinations]]`` table)."""

    name: str
    ae_title: str
    host: str
    port: int
    send: tuple[str, ...]
    tls: bool = False
    rate_limit_bytes_per_s: int | None = None


def parse_send(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"images,ai-results"`` (or a list) -> the categories, checked; DestinationError names a bad one.

    ``"none"`` alone -> ``()``: nothing is pushed to the peer, which is only a C-MOVE destination.
    """
    parts = value.split(",") if isinstance(value, str) else list(value)
    categories = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if categories == ("none",) or (not categories and not isinstance(value, str)):
        return ()  # "none", or an already parsed empty tuple (a spec made from "none")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise DestinationError(
            f"--send: unknown {', '.join(map(repr, unknown)) or 'empty list'}; use a comma list of {', '.join(CATEGORIES)}, or none"
        )
    return categories


def _validated(spec: DestinationSpec) -> DestinationSpec:
    name = spec.name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise DestinationError(f"invalid destination name {spec.name!r}: 1-64 printable characters")
    try:
        ae_title = normalise_ae_title(spec.ae_title)
    except StationError as exc:
        raise DestinationError(str(exc)) from exc
    if not 1 <= int(spec.port) <= 65535:
        raise DestinationError(f"invalid port {spec.port}: 1-65535")
    if not spec.host.strip():
        raise DestinationError("a destination needs a host")
    rate = spec.rate_limit_bytes_per_s
    if rate is not None and rate <= 0:
        raise DestinationError("rate limit must be a positive number of bytes per second")
    return DestinationSpec(
        name, ae_title, spec.host.strip(), int(spec.port), parse_send(spec.send), spec.tls, rate
    )


def add_destination(session: Session, spec: DestinationSpec, *, source: str = SOURCE_CLI) -> Destination:
    spec = _validated(spec)
    if session.scalar(select(Destination).where(Destination.name == spec.name)) is not None:
        raise DestinationError(f"destination {spec.name!r} already exists (remove it first to change it)")
    destination = Destination(
        name=spec.name, ae_title=spec.ae_title, host=spec.host, port=spec.port, send=",".join(spec.send),
        tls=spec.tls, rate_limit_bytes_per_s=spec.rate_limit_bytes_per_s, source=source,
    )  # fmt: skip
    session.add(destination)
    session.flush()
    return destination


def remove_destination(session: Session, name: str) -> bool:
    """Remove a destination and its queue (pending rows are dropped: nobody will send them)."""
    destination = session.scalar(select(Destination).where(Destination.name == name))
    if destination is None:
        return False
    if destination.source == SOURCE_CONFIG:
        raise DestinationError(f"destination {name!r} is defined in the configuration file; remove it there")
    session.execute(Delivery.__table__.delete().where(Delivery.destination_id == destination.id))
    session.delete(destination)
    return True


def retry_destination(session: Session, name: str, now: datetime | None = None) -> int:
    """Make every pending object of ``name`` (and the peer itself) due now; returns how many are pending."""
    now = now or utcnow()
    destination = session.scalar(select(Destination).where(Destination.name == name))
    if destination is None:
        raise DestinationError(f"no destination named {name!r} (see 'xray-triage destinations list')")
    destination.next_attempt_at = None
    result = session.execute(
        update(Delivery)
        .where(Delivery.destination_id == destination.id, Delivery.state == DELIVERY_PENDING)
        .values(next_attempt_at=now)
    )
    return int(result.rowcount or 0)


def sync_configured(session: Session, specs: Iterable[DestinationSpec]) -> None:
    """Make the ``source = config`` destinations match the TOML file's ``[[destinations]]`` tables.

    A table with the name of a CLI-added destination is an error (one name, one definition). A
    configured destination that left the file is removed with its queue.
    """
    wanted = {spec.name.strip(): _validated(spec) for spec in specs}
    existing = {d.name: d for d in session.scalars(select(Destination))}
    for name, spec in wanted.items():
        row = existing.get(name)
        if row is None:
            add_destination(session, spec, source=SOURCE_CONFIG)
        elif row.source != SOURCE_CONFIG:
            raise DestinationError(
                f"destination {name!r} is both in the configuration file and added by the CLI"
            )
        else:
            row.ae_title, row.host, row.port, row.send = (
                spec.ae_title,
                spec.host,
                spec.port,
                ",".join(spec.send),
            )
            row.tls, row.rate_limit_bytes_per_s = spec.tls, spec.rate_limit_bytes_per_s
    for name, row in existing.items():
        if row.source == SOURCE_CONFIG and name not in wanted:
            session.execute(Delivery.__table__.delete().where(Delivery.destination_id == row.id))
            session.delete(row)
    session.flush()


def list_destinations(session: Session) -> list[Destination]:
    return list(session.scalars(select(Destination).order_by(Destination.name)))


def destination_states(
    session: Session, *, failing_degraded_s: float, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Each destination with its queue: ``queued`` (pending), ``sent``, ``failed`` (pending objects whose
    last attempt failed), ``last_error``, ``last_success_at``, ``failing_since`` and ``state``: ``ok``,
    ``failing`` (the last attempt failed) or ``degraded`` (failing for longer than ``failing_degraded_s``).
    JSON values (times as ISO 8601 strings, UTC)."""
    now = now or utcnow()
    counts = {
        row.destination_id: row
        for row in session.execute(
            select(
                Delivery.destination_id,
                func.sum(case((Delivery.state == DELIVERY_PENDING, 1), else_=0)).label("queued"),
                func.sum(case((Delivery.state == DELIVERY_SENT, 1), else_=0)).label("sent"),
                func.sum(
                    case(((Delivery.state == DELIVERY_PENDING) & (Delivery.attempts > 0), 1), else_=0)
                ).label("failed"),
            ).group_by(Delivery.destination_id)
        )
    }
    states = []
    for d in list_destinations(session):
        c = counts.get(d.id)
        state = "ok"
        if d.failing_since is not None:
            failing_for = (now - d.failing_since).total_seconds()
            state = "degraded" if failing_for > failing_degraded_s else "failing"
        states.append(
            {
                "name": d.name,
                "ae_title": d.ae_title,
                "host": d.host,
                "port": d.port,
                "send": list(d.categories),
                "tls": d.tls,
                "rate_limit_bytes_per_s": d.rate_limit_bytes_per_s,
                "source": d.source,
                "state": state,
                "queued": int(c.queued or 0) if c else 0,
                "sent": int(c.sent or 0) if c else 0,
                "failed": int(c.failed or 0) if c else 0,
                "last_error": d.last_error,
                "last_error_at": _iso(d.last_error_at),
                "last_success_at": _iso(d.last_success_at),
                "failing_since": _iso(d.failing_since),
            }
        )
    return states


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
