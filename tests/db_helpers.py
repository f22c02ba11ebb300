"""Which database the tests use: SQLite (default) or a PostgreSQL server.

``XRAY_TRIAGE_TEST_DATABASE_URL=postgresql+psycopg://user@host:port/postgres`` (set by
``scripts/test.sh`` from ``scripts/pg-test-cluster.sh``) runs the suite on PostgreSQL: each test
(and each server data directory of the end-to-end tests) gets its own database, made with
``CREATE DATABASE`` and dropped afterwards. Unset, everything is SQLite in the test's temporary
directory, as before.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

TEST_DATABASE_URL_ENV = "XRAY_TRIAGE_TEST_DATABASE_URL"
_by_data_dir: dict[Path, str] = {}


def server_url() -> str | None:
    """The PostgreSQL server's maintenance URL, or None when the tests run on SQLite."""
    return os.environ.get(TEST_DATABASE_URL_ENV) or None


def on_postgres() -> bool:
    return server_url() is not None


def _admin_execute(sql: str) -> None:
    url = server_url()
    assert url is not None
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def create_database() -> str:
    """A new, empty PostgreSQL database; its URL."""
    url = make_url(server_url())
    name = f"xt_{uuid.uuid4().hex[:16]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    name = make_url(database_url).database
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(tmp_path: Path) -> str:
    """A fresh database for one test: SQLite under ``tmp_path`` or a new PostgreSQL database."""
    if not on_postgres():
        return f"sqlite:///{tmp_path / 'test.db'}"
    return create_database()


def db_env(data_dir: Path) -> dict[str, str]:
    """``XRAY_TRIAGE_DATABASE_URL`` for every process using ``data_dir`` (empty on SQLite: the default)."""
    if not on_postgres():
        return {}
    key = Path(data_dir).resolve()
    if key not in _by_data_dir:
        _by_data_dir[key] = create_database()
    return {"XRAY_TRIAGE_DATABASE_URL": _by_data_dir[key]}


def drop_data_dir_databases() -> None:
    """Drop the databases ``db_env`` made (at the end of the session)."""
    while _by_data_dir:
        _, url = _by_data_dir.popitem()
        with contextlib.suppress(Exception):  # best effort; the throwaway cluster goes anyway
            drop_database(url)
