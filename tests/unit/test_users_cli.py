"""``xray-triage users`` and ``tokens``: accounts are created, listed, disabled; passwords hashed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from xray_triage.settings import Settings
from xray_triage.store.db import open_database
from xray_triage.store.users import get_user, user_for_api_token
from xray_triage_server.cli import main


def _run(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(list(args))


def test_users_and_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["stations", "add", "TYT_THANHAN", "--name", "Trạm Y tế Thạnh An", *data]) == 0
    assert _run(monkeypatch, "users", "add", "an", "--role", "station", "--password-stdin", *data, stdin="mat-khau-rat-dai\n") == 2
    assert "needs --station" in capsys.readouterr().err
    assert _run(monkeypatch, "users", "add", "an", "--role", "station", "--station", "NOPE", "--password-stdin", *data, stdin="mat-khau-rat-dai\n") == 2
    assert "not registered" in capsys.readouterr().err
    assert _run(monkeypatch, "users", "add", "an", "--role", "specialist", "--password-stdin", *data, stdin="short\n") == 2
    assert "too short" in capsys.readouterr().err
    assert _run(monkeypatch, "users", "add", "an", "--role", "station", "--station", "TYT_THANHAN", "--name", "BS. Nguyễn Văn An", "--password-stdin", *data, stdin="mat-khau-rat-dai\n") == 0
    assert _run(monkeypatch, "users", "add", "an", "--role", "admin", "--password-stdin", *data, stdin="mat-khau-rat-dai\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["users", "list", *data]) == 0
    listing = capsys.readouterr().out
    assert "an" in listing and "TYT_THANHAN" in listing and "BS. Nguyễn Văn An" in listing

    assert main(["tokens", "create", "an", *data]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("xrt_") and len(token) > 40

    db = open_database(Settings(data_dir=tmp_path))
    with db.session() as session:
        user = get_user(session, "an")
        assert user is not None and user.password_hash.startswith("$argon2id$")
        assert "mat-khau" not in user.password_hash
        assert user_for_api_token(session, token) is not None
    assert main(["users", "disable", "an", *data]) == 0
    with db.session() as session:
        assert user_for_api_token(session, token) is None  # disabling revokes the tokens
    db.dispose()
    assert main(["tokens", "create", "an", *data]) == 2
    assert main(["users", "disable", "nobody", *data]) == 2
