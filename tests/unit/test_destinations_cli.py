"""``xray-triage destinations``: add, list (text and JSON), retry, remove; bad input is one line (exit 2);
``[[destinations]]`` tables of the TOML file show up too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xray_triage_server.cli import main


def test_destinations_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    add = ["destinations", "add", "pacs", "--ae-title", "ORTHANC", "--host", "127.0.0.1", "--port", "4242"]
    assert main([*add, "--send", "images,pictures", *data]) == 2
    assert "unknown 'pictures'" in capsys.readouterr().err
    assert main([*add, "--send", "images,ai-results", "--rate-limit", "250000", *data]) == 0
    assert "added destination pacs" in capsys.readouterr().out
    assert main([*add, "--send", "images", *data]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["destinations", "list", *data]) == 0
    assert "ORTHANC@127.0.0.1:4242" in capsys.readouterr().out
    assert main(["destinations", "list", "--json", *data]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["send"], row["rate_limit_bytes_per_s"], row["state"]) == (
        "pacs", ["images", "ai-results"], 250000, "ok"
    )
    assert (row["queued"], row["sent"], row["failed"], row["last_error"], row["last_success_at"]) == (0, 0, 0, None, None)
    assert main(["destinations", "retry", "pacs", *data]) == 0
    assert main(["destinations", "retry", "nope", *data]) == 2
    assert "no destination named 'nope'" in capsys.readouterr().err
    assert main(["destinations", "remove", "pacs", *data]) == 0
    assert main(["destinations", "remove", "pacs", *data]) == 2


def test_toml_destinations_are_listed_and_removed_only_in_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "xray-triage.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n\n[[destinations]]\nname = "archive"\nae_title = "ARCHIVE"\n'
        'host = "10.0.0.9"\nport = 104\nsend = ["ai-results", "consult-results"]\ntls = true\n',
        encoding="utf-8",
    )
    assert main(["destinations", "list", "--json", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["source"], row["tls"], row["send"]) == ("archive", "config", True, ["ai-results", "consult-results"])
    assert main(["destinations", "remove", "archive", "--config", str(config)]) == 2
    assert "configuration file" in capsys.readouterr().err
