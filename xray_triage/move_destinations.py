"""Where a C-MOVE sends its images: the Move Destination AE title -> host, port, TLS.

PS3.4 C.4.2.1.2: the SCP must know the destination by its AE title; an unknown one is
answered 0xA801 (Move destination unknown). Destinations are the delivery registry's
(``xray_triage/store/destinations.py``: ``xray-triage destinations add NAME --ae-title AE
--host HOST --port PORT ...`` and the TOML ``[[destinations]]`` tables, synchronised into
the same table at start-up). A destination is looked up at each C-MOVE, so one added
with the CLI while the server runs is usable at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from xray_triage.store.db import Database
from xray_triage.store.delivery_schema import Destination

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoveDestination:
    name: str
    host: str
    port: int
    tls: bool


def resolve_move_destination(session: Session, ae_title: str) -> MoveDestination | None:
    """The destination whose AE title is ``ae_title`` (compared without padding, case sensitively,
    PS3.8 9.3.2); None when there is none. Several with that AE title (other hosts): the first
    one registered is used, and a warning says so."""
    rows = session.scalars(
        select(Destination).where(Destination.ae_title == ae_title.strip()).order_by(Destination.id)
    ).all()
    if not rows:
        return None
    if len({(r.host, r.port) for r in rows}) > 1:
        log.warning(
            "several destinations have this AE title; C-MOVE uses the first registered",
            extra={"ae_title": ae_title.strip(), "destinations": [r.name for r in rows]},
        )
    first = rows[0]
    return MoveDestination(first.name, first.host, first.port, bool(first.tls))


def move_resolver(db: Database) -> Callable[[str], MoveDestination | None]:
    """``resolve_move_destination(ae_title) -> MoveDestination | None`` over ``db``'s registry."""

    def resolve(ae_title: str) -> MoveDestination | None:
        with db.read_session() as session:
            return resolve_move_destination(session, ae_title)

    return resolve
