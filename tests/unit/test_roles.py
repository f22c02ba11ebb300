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


@pytest.mark.parametrize("roles", ["receiver", "gateway,receiver"])
def test_the_receiver_role_is_not_a_setting(roles: str) -> None:
    """Receiver processes are started by the gateway process (``gateway_processes``), never configured."""
    with pytest.raises(SettingsError, match="roles must be a comma-separated subset of gateway,worker,web"):
        load_settings(None, roles=roles)


def test_serve_roles_receiver_by_hand_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from xray_triage_server.cli import main

    assert main(["serve", "--roles", "receiver"]) == 2
    assert "started by the gateway process" in capsys.readouterr().err


def test_gateway_processes_is_at_least_one() -> None:
    assert Settings().gateway_processes == 1
    assert load_settings(None, gateway_processes=4).gateway_processes == 4
    with pytest.raises(SettingsError, match="gateway_processes"):
        load_settings(None, gateway_processes=0)


def test_serve_gateway_processes_flag_reaches_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from xray_triage import logging_setup
    from xray_triage_server import cli, serve

    seen: list[int] = []
    monkeypatch.setattr(logging_setup, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "run_server", lambda settings: seen.append(settings.gateway_processes) or 0)
    assert cli.main(["serve", "--gateway-processes", "3"]) == 0
    assert seen == [3]
