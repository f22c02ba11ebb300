"""What an edge station still has to send: per destination, the images waiting and since when.

The station doctor's worklist shows it ("12 images waiting to be sent to centre, oldest since
14:05"), so a link that has been down for hours is visible where the work is done, not only
on the admin page. Read from the durable ``deliveries`` queue (``delivery_schema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from xray_triage.store.delivery_schema import CATEGORY_IMAGES, DELIVERY_PENDING, Delivery, Destination


@dataclass(frozen=True)
class Backlog:
    """``waiting`` images not yet acknowledged by ``destination``; the oldest was queued at ``oldest_since`` (UTC)."""

    destination: str
    waiting: int
    oldest_since: datetime


def waiting_images(session: Session) -> list[Backlog]:
    """Destinations with images still pending, by name; empty when everything is delivered."""
    rows = session.execute(
        select(Destination.name, func.count(Delivery.id), func.min(Delivery.created_at))
        .join(Delivery, Delivery.destination_id == Destination.id)
        .where(Delivery.state == DELIVERY_PENDING, Delivery.category == CATEGORY_IMAGES)
        .group_by(Destination.id, Destination.name)
        .order_by(Destination.name)
    )
    return [Backlog(name, int(count), oldest) for name, count, oldest in rows]
