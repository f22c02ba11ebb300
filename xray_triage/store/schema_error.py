"""The error for a database schema that does not fit the code (its own module: the CLI catches it
without importing Alembic)."""


class SchemaError(RuntimeError):
    """The database schema does not fit this version of the code; the message says what to do."""
