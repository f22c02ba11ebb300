"""``xray-triage db``: the database schema (Alembic migrations, ``xray_triage/store/migrate.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser, settings_of: Callable[..., Any]) -> None:
    db = sub.add_parser("db", help="the database schema: upgrade it, show its version")
    db_sub = db.add_subparsers(dest="db_cmd", required=True)
    upgrade = db_sub.add_parser(
        "upgrade", parents=[common], help="apply pending schema migrations (back up the database first)"
    )
    upgrade.set_defaults(func=lambda args: cmd_upgrade(settings_of(args)))
    status = db_sub.add_parser("status", parents=[common], help="the schema's revision and this code's")
    status.set_defaults(func=lambda args: cmd_status(settings_of(args)))


def cmd_upgrade(settings: Any) -> int:
    from xray_triage.store import migrate
    from xray_triage.store.db import Database

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        before = migrate.schema_state(db.engine)
        after = migrate.upgrade(db.engine)
    finally:
        db.dispose()
    if before.current == after.current:
        print(f"database schema already at {after.current} (head)")
    else:
        print(f"database schema upgraded from {before.current or 'none (0.1.0 or empty)'} to {after.current}")
    return 0


def cmd_status(settings: Any) -> int:
    from xray_triage.store import migrate
    from xray_triage.store.db import Database

    db = Database(settings.resolved_database_url)
    try:
        state = migrate.schema_state(db.engine)
    finally:
        db.dispose()
    print(f"{state.state}: database at {state.current or 'none'}, this version needs {state.head}")
    return 0 if state.state == migrate.CURRENT else 1
