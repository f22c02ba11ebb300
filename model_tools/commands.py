"""The tooling's ``xray-triage`` subcommands, registered through an entry point.

``pyproject.toml`` lists :func:`register` in the ``xray_triage.commands``
entry-point group; ``xray_triage_server.cli.register_plugin_commands`` calls it while it
builds the parser. Nothing here imports torch: the parser is built on every
``xray-triage`` call, also where the ``export`` extra is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_tools.export.cli import register as register_export

if TYPE_CHECKING:
    from xray_triage_server.cli import CommandGroups


def register(groups: CommandGroups) -> None:
    """Add ``xray-triage models export-torchxrayvision`` (and any later export-* command)."""
    register_export(groups.models)
