"""Alembic environment: run with the connection ``xray_triage.store.migrate`` hands over.

The migrations run in the connection's own transaction; autogenerate compares against
``Base.metadata`` (every table the server's code knows).
"""

from __future__ import annotations

from alembic import context

from xray_triage.store.db import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic` command line without our wrapper: not supported
    raise RuntimeError("run migrations through `xray-triage db upgrade` (xray_triage.store.migrate)")

context.configure(
    connection=connection,
    target_metadata=metadata(),
    render_as_batch=True,  # SQLite cannot ALTER most columns: batch mode copies the table
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
