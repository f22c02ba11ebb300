"""Issue 16 item 14: the CLI's start-up errors are one clear line, and a busy HTTP port starts nothing.

Real ``xray-triage`` processes (``run_cli``); the busy ports are real sockets held by the test on
127.0.0.1. Also runs the README's token example as written.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from db_helpers import db_env

from e2e_helpers import PROJECT_ROOT, free_port, run_cli, server_env

pytestmark = pytest.mark.slow


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit 2 and ended on one ``xray-triage: error:`` line, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xray-triage: error: "), proc.stderr
    return last


def test_malformed_toml_and_bad_log_level_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("http_port = [oops\n", encoding="utf-8")
    line = _one_line_error(run_cli("studies", "list", "--config", bad, "--data-dir", tmp_path / "d"))
    assert "bad.toml: not valid TOML" in line and "line 1" in line
    env = server_env({"XRAY_TRIAGE_LOG_LEVEL": "LOUD"})
    line = _one_line_error(run_cli("serve", "--data-dir", tmp_path / "d", env=env))
    assert "log_level" in line and "'LOUD'" in line and "DEBUG, INFO" in line


def test_busy_http_port_stops_start_up_before_the_gateway_listens(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port, dicom_port = busy.getsockname()[1], free_port()
        proc = run_cli(
            "serve", "--data-dir", tmp_path / "d", "--http-host", "127.0.0.1", "--dicom-host", "127.0.0.1",
            "--http-port", str(http_port), "--dicom-port", str(dicom_port), timeout=60,
        )  # fmt: skip
        line = _one_line_error(proc)
        assert f"cannot listen for HTTP on 127.0.0.1:{http_port}: the port is already in use" in line
        assert "DICOM gateway listening" not in proc.stderr + proc.stdout  # nothing was acknowledged meanwhile
        proc = run_cli(
            "serve", "--data-dir", tmp_path / "d", "--http-host", "127.0.0.1", "--dicom-host", "127.0.0.1",
            "--http-port", str(free_port()), "--dicom-port", str(http_port), timeout=60,
        )  # fmt: skip
        line = _one_line_error(proc)
        assert f"cannot listen for DICOM on 127.0.0.1:{http_port}: the port is already in use" in line


def test_readme_token_example_works_as_written(tmp_path: Path) -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Reading results", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if "users add reader" in line or "tokens create reader" in line]
    assert len(lines) == 2, lines
    script = "set -e\n" + "\n".join(lines) + '\nprintf "%s" "$TOKEN" > "$TOKEN_FILE"\n'
    env = server_env(
        {"XRAY_TRIAGE_DATA_DIR": str(tmp_path / "d"), "TOKEN_FILE": str(tmp_path / "token"), **db_env(tmp_path / "d")}
    )
    proc = subprocess.run(
        ["bash", "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    token = (tmp_path / "token").read_text(encoding="utf-8")
    assert re.fullmatch(r"[A-Za-z0-9_\-\.]{20,}", token), token  # the token alone, one word
    from fastapi.testclient import TestClient

    from consult_web.app import create_app
    from xray_triage.settings import load_settings
    from xray_triage.store.db import open_database

    db = open_database(load_settings(None, data_dir=tmp_path / "d", **_db_override(tmp_path / "d")))
    try:
        client = TestClient(create_app(db, None))
        answer = client.get("/api/studies?limit=50&offset=0", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json()["studies"] == []
    finally:
        db.dispose()


def _db_override(data_dir: Path) -> dict[str, str]:
    """The data directory's test database (PostgreSQL pass), as a settings override."""
    url = db_env(data_dir).get("XRAY_TRIAGE_DATABASE_URL")
    return {"database_url": url} if url else {}
