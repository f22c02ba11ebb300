"""Which database the tests use: SQLite (default) or a PostgreSQL server.

``XRAY_TRIAGE_TEST_DATABASE_URL=postgresql+psycopg://user@host:port/postgres`` (set by
``scripts/test.sh`` from ``scripts/pg-test-cluster.sh``) runs the suite on PostgreSQL: each test
(and each server data directory of the end-to-end tests) gets its own database, a copy of a
template at the schema's head (``CREATE DATABASE ... TEMPLATE``), dropped afterwards; the
``database_url`` fixture gives an empty one (migration tests). Unset, everything is SQLite in the test's temporary
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


_template: list[str] = []  # the name of this session's template database, once made


def _schema_template() -> str:
    """A database at the schema's head, made once per test session: copying it (CREATE DATABASE
    ... TEMPLATE) is much cheaper than running every migration again for each test."""
    if not _template:
        from xray_triage.store import migrate
        from xray_triage.store.db import Database

        url = create_database(with_schema=False)
        db = Database(url)
        try:
            migrate.upgrade(db.engine)
        finally:
            db.dispose()
        _template.append(make_url(url).database or "")
    return _template[0]


def create_database(*, with_schema: bool = True) -> str:
    """A new PostgreSQL database, at the schema's head (or empty); its URL."""
    url = make_url(server_url())
    name = f"xt_{uuid.uuid4().hex[:16]}"
    template = f' TEMPLATE "{_schema_template()}"' if with_schema else ""
    _admin_execute(f'CREATE DATABASE "{name}"{template}')
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(database_url: str) -> None:
    name = make_url(database_url).database
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(tmp_path: Path) -> str:
    """A fresh, empty database for one test: SQLite under ``tmp_path`` or a new PostgreSQL database."""
    if not on_postgres():
        return f"sqlite:///{tmp_path / 'test.db'}"
    return create_database(with_schema=False)


def db_env(data_dir: Path) -> dict[str, str]:
    """``XRAY_TRIAGE_DATABASE_URL`` for every process using ``data_dir`` (empty on SQLite: the default)."""
    if not on_postgres():
        return {}
    key = Path(data_dir).resolve()
    if key not in _by_data_dir:
        _by_data_dir[key] = create_database()
    return {"XRAY_TRIAGE_DATABASE_URL": _by_data_dir[key]}


def drop_data_dir_databases() -> None:
    """Drop the databases ``db_env`` made, and the template (at the end of the session)."""
    urls = list(_by_data_dir.values())
    _by_data_dir.clear()
    if _template:
        urls.append(make_url(server_url()).set(database=_template.pop()).render_as_string(hide_password=False))
    for url in urls:
        with contextlib.suppress(Exception):  # best effort; the throwaway cluster goes anyway
            drop_database(url)
