"""Database engine and sessions.

SQLite is the embedded default. Three settings make it safe for a gateway that
acknowledges images only after they are committed:

* WAL journal, so readers (the web view) never block the writer;
* ``synchronous=FULL``, so a committed row survives a power cut;
* ``BEGIN IMMEDIATE`` for every transaction of ``session()``, so concurrent
  associations queue on the write lock (up to the busy timeout) instead of failing
  with "database is locked" when a read transaction tries to upgrade to a write.
  ``read_session()`` (pure reads: web pages, live-update polls) begins deferred and
  never takes that lock.

Any other SQLAlchemy URL (e.g. PostgreSQL) is used as given.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from xray_triage.events import EventHandlers
from xray_triage.store import (
    consult_schema,  # noqa: F401  (registers the consult tables on Base)
    delivery_schema,  # noqa: F401  (registers the destinations and deliveries tables on Base)
    migrate,
    outbox,  # registers the outbox tables on Base, and the after-commit dispatch
    result_objects,  # noqa: F401  (registers the table of the DICOM objects we make)
)
from xray_triage.store.schema import Base

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30


class Database:
    """An engine plus a session factory; ``session()`` is a unit of work."""

    def __init__(self, url: str, events: EventHandlers | None = None) -> None:
        """``events``: the in-process handlers called after a transaction that recorded events commits."""
        self.url = url
        self.events = events if events is not None else EventHandlers()
        info = {outbox.HANDLERS_KEY: self.events}
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, info=info)
        # Reads (web pages, live-update polls, logins) must not queue on SQLite's write lock
        # behind the gateway: they get their own engine whose transactions BEGIN DEFERRED.
        in_memory = url.startswith("sqlite") and (url.rstrip("/") == "sqlite:" or ":memory:" in url)
        self.read_engine = self.engine if in_memory else make_engine(url, immediate=False)
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False, info=info)

    def create_schema(self) -> None:
        """Create the schema of an empty database (Alembic ``upgrade head``); check any other.

        Raises ``migrate.SchemaError`` (naming ``xray-triage db upgrade``) when the schema is
        older or newer than this code's. Schema changes are Alembic migrations
        (``store/migrations``), never ``create_all``.
        """
        migrate.ensure_schema(self.engine)

    def upgrade_schema(self) -> migrate.SchemaState:
        """Apply every pending migration (``xray-triage db upgrade``)."""
        return migrate.upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A read-only unit of work: never takes the write lock; anything written is rolled back."""
        session = self._read_sessions()
        try:
            yield session
        finally:
            session.rollback()
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


def metadata() -> MetaData:
    """Every table the code knows (what Alembic's autogenerate compares the database with)."""
    return Base.metadata


def make_engine(url: str, *, immediate: bool = True) -> Engine:
    """``immediate``: SQLite transactions take the write lock at BEGIN (the default, for writers)."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class DatabaseSettings(Protocol):
    """What ``open_database`` reads of ``xray_triage.settings.Settings``. A protocol, not an
    import: the settings module validates with the store (``store/charset.py``), so the
    store importing it back would make a cycle."""

    @property
    def data_dir(self) -> Path: ...

    @property
    def resolved_database_url(self) -> str: ...


def open_database(settings: DatabaseSettings) -> Database:
    """The configured database, with its schema created; the data directory made if needed."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    db.create_schema()
    return db
