"""``serve --roles``: which parts a process runs (README "Several processes")."""

from __future__ import annotations

import pytest

from xray_triage.settings import Settings, SettingsError, load_settings


def test_roles_default_to_all_three_and_are_normalised() -> None:
    assert Settings().role_set == {"gateway", "worker", "web"}
    assert Settings(roles=" Web, gateway ").roles == "gateway,web"
    assert Settings(roles="worker").role_set == {"worker"}


@pytest.mark.parametrize("roles", ["", "gateway,viewer", ","])
def test_an_unknown_or_empty_role_stops_start_up_with_one_line(roles: str) -> None:
    with pytest.raises(SettingsError, match="roles must be a comma-separated subset of gateway,worker,web"):
        load_settings(None, roles=roles)
