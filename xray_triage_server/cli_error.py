"""The error every ``xray-triage`` command raises for a problem the user can fix.

Its own module so that the command modules (``cli.py``, ``cli_users.py``) can share
it without importing each other.
"""


class CliError(Exception):
    """An error to print as one line, exit status 2."""
