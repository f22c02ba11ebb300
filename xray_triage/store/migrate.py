"""Schema versions with Alembic: create, check and upgrade the database schema.

The migrations live in ``xray_triage/store/migrations/versions`` (package data). The
first one, ``0001_baseline``, is the schema of release 0.1.0 (main at 7f0ccd2), which
was made by ``create_all`` and has no ``alembic_version`` table. Such a database is
recognised by its tables and upgraded from the baseline: the baseline migration only
adds what is missing (tables and indexes of the 0.1.0 schema, as ``create_all`` did)
and refuses a table that lacks a column of the baseline.

States of a database (:func:`schema_state`):

* ``empty``: no table of ours; ``ensure_schema`` creates it (``upgrade head``), so the
  first ``xray-triage serve`` on an empty data directory needs no extra command;
* ``current``: at the head revision;
* ``outdated``: older (or unversioned 0.1.0): the server refuses to start and says
  ``xray-triage db upgrade``;
* ``newer``: a revision this code does not know (written by a newer version): refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from xray_triage.store.schema_error import SchemaError

log = logging.getLogger(__name__)

UPGRADE_COMMAND = "xray-triage db upgrade"
EMPTY, CURRENT, OUTDATED, NEWER = "empty", "current", "outdated", "newer"
MARKER_TABLE = "stations"  # present in every database any version of xray-triage made


@dataclass(frozen=True)
class SchemaState:
    state: str
    current: str | None  # revision in alembic_version (None: none, e.g. a 0.1.0 database)
    head: str


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("xray_triage.store") / "migrations"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def schema_state(engine: Engine) -> SchemaState:
    """Where the database stands against this code's migrations (reads only)."""
    head = head_revision()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        has_tables = inspect(conn).has_table(MARKER_TABLE)
        conn.rollback()
    if current is None:
        return SchemaState(OUTDATED if has_tables else EMPTY, None, head)
    if current == head:
        return SchemaState(CURRENT, current, head)
    known = {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    return SchemaState(OUTDATED if current in known else NEWER, current, head)


def upgrade(engine: Engine, revision: str = "head") -> SchemaState:
    """Apply the migrations up to ``revision``, in one transaction (also for an unversioned 0.1.0 database)."""
    before = schema_state(engine)
    if before.state == NEWER:
        raise SchemaError(
            f"the database schema is at revision {before.current}, newer than this version of xray-triage "
            f"knows (head {before.head}): upgrade xray-triage"
        )
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    after = schema_state(engine)
    if after.current != before.current:
        log.info("database schema upgraded", extra={"from": before.current or "none", "to": after.current})
    return after


def ensure_schema(engine: Engine) -> SchemaState:
    """Create the schema of an empty database; refuse one that is not at this code's head.

    Raises SchemaError (naming ``xray-triage db upgrade``) for an older schema.
    """
    state = schema_state(engine)
    if state.state == EMPTY:
        return upgrade(engine)
    if state.state == OUTDATED:
        raise SchemaError(
            f"the database schema is older than this version of xray-triage "
            f"(at {state.current or '0.1.0, unversioned'}, needs {state.head}): "
            f"back up the database, then run `{UPGRADE_COMMAND}`"
        )
    if state.state == NEWER:
        raise SchemaError(
            f"the database schema is at revision {state.current}, newer than this version of xray-triage "
            f"knows (head {state.head}): upgrade xray-triage"
        )
    return state
