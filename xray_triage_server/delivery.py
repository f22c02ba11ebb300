"""Wires delivery to PACS: the TOML file's destinations, the ``delivery`` outbox consumer, the senders.

The consumer (``OutboxConsumer(db, "delivery", ...)``) turns each ``InstanceStored`` and
``ResultObjectStored`` event into queue rows (``store/deliveries.enqueue``) in the transaction
that advances its cursor; once that commits, the senders (``dicom_sender/service.py``) are woken.
Events no destination wants (``deliveries.wanted``: images while no destination takes images,
any other type) are skipped without a write transaction (``outbox_consumer.py``).
"""

from __future__ import annotations

import logging

from sqlalchemy import event as sa_event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dicom_sender.service import DeliveryService, SenderConfig
from xray_triage.outbox_consumer import OutboxConsumer
from xray_triage.settings import Settings
from xray_triage.store import deliveries
from xray_triage.store.db import Database
from xray_triage.store.destinations import DestinationError, DestinationSpec, sync_configured
from xray_triage.store.outbox import StoredEvent

log = logging.getLogger(__name__)

CONSUMER_NAME = "delivery"  # its cursor's key in outbox_cursors: never rename


def configured_specs(settings: Settings) -> list[DestinationSpec]:
    return [
        DestinationSpec(d.name, d.ae_title, d.host, d.port, tuple(d.send), d.tls, d.rate_limit_bytes_per_s)
        for d in settings.destinations
    ]


def sender_config(settings: Settings) -> SenderConfig:
    return SenderConfig(
        data_dir=settings.data_dir,
        calling_ae_title=settings.ae_title,
        retry_initial_s=settings.delivery_retry_initial_s,
        retry_max_s=settings.delivery_retry_max_s,
        batch_size=settings.delivery_batch_size,
        poll_s=settings.delivery_poll_s,
        timeout_s=settings.delivery_timeout_s,
        tls_ca_file=settings.delivery_tls_ca_file,
        tls_cert_file=settings.delivery_tls_cert_file,
        tls_key_file=settings.delivery_tls_key_file,
    )


class DeliveryRuntime:
    """The consumer and the senders of one server process."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.service = DeliveryService(db, sender_config(settings))
        self.consumer = OutboxConsumer(
            db, CONSUMER_NAME, self._handle, poll_s=settings.delivery_poll_s, wants=deliveries.wanted
        )

    def _handle(self, session: Session, stored: StoredEvent) -> None:
        if deliveries.enqueue(session, stored) and not session.info.get("delivery_wake"):
            session.info["delivery_wake"] = True
            sa_event.listen(session, "after_commit", lambda _s: self.service.wake(), once=True)

    def start(self) -> None:
        """Synchronise ``[[destinations]]`` into the database, then start the consumer and the senders.

        Raises ``DestinationError`` for a bad table (start-up stops with one line). A database that
        cannot be written yet (degraded storage) is logged; the senders still start.
        """
        try:
            with self.db.session() as session:
                sync_configured(session, configured_specs(self.settings))
        except SQLAlchemyError as exc:
            log.error("could not record the configured destinations", extra={"error": str(exc)})
        self.consumer.start()
        self.service.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.consumer.stop()
        self.service.stop(timeout_s)


__all__ = ["CONSUMER_NAME", "DeliveryRuntime", "DestinationError"]
