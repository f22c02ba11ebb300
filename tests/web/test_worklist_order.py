"""Issue 16 items 1-2: a human emergency never sinks under AI flags, and each row says why.

One order (``xray_triage.store.worklist_order``) for the web worklist, ``/api/studies`` and
``xray-triage studies list``; rows carry their tier and the flagged findings with thresholds.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from web_helpers import WebEnv, add_station_row, add_user_row, client_for, make_web_env
from worklist_cases import EXPECTED, store_cases

from xray_triage.settings import DEFAULT_MODEL_DIR
from xray_triage.store.worklist_order import TIERS, why
from xray_triage_server.cli import main

ROWS = re.compile(r'<tr class="priority-[a-z]+" data-study-uid="([^"]+)" data-why="([a-z_]+)"')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("order"), model_dir=DEFAULT_MODEL_DIR)
    add_station_row(env, "STATION1")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    env.uids = store_cases(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1", "st1")  # type: ignore[attr-defined]
    return env


def _names(env: WebEnv) -> dict[str, str]:
    return {uid: name for name, uid in env.uids.items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("user", ["spec", "st1"])
def test_worklist_puts_open_emergency_consults_first_and_says_why(env: WebEnv, user: str) -> None:
    client, _ = client_for(env, user)
    page = client.get("/worklist/rows")
    assert page.status_code == 200
    names = _names(env)
    assert [(names[uid], tier) for uid, tier in ROWS.findall(page.text)] == EXPECTED


def test_api_and_cli_use_the_same_order_and_why(
    env: WebEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XRAY_TRIAGE_DATABASE_URL", env.settings.resolved_database_url)  # the module's database
    client, _ = client_for(env, "spec")
    names = _names(env)
    studies = client.get("/api/studies?limit=100").json()["studies"]
    assert [(names[s["study_uid"]], s["why"]) for s in studies] == EXPECTED
    data = ["--data-dir", str(env.data_dir)]
    assert main(["studies", "list", "--json", *data]) == 0
    assert [(names[s["study_uid"]], s["why"]) for s in json.loads(capsys.readouterr().out)] == EXPECTED
    assert main(["studies", "list", *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "times in Asia/Ho_Chi_Minh (the default_timezone setting)"
    first = lines[2]
    assert first.startswith("emergency consult request (open)") and env.uids["emergency_on_normal"] in first  # type: ignore[attr-defined]
    assert lines[3].startswith("urgent consult request (open)")
    received = datetime.fromisoformat(studies[0]["received_at"]).astimezone(ZoneInfo("Asia/Ho_Chi_Minh"))
    assert received.strftime("%Y-%m-%d %H:%M") in first  # the server's zone, not UTC


def test_findings_are_the_flagged_ones_with_threshold_and_urgent_mark(
    env: WebEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XRAY_TRIAGE_DATABASE_URL", env.settings.resolved_database_url)  # the module's database
    uid = env.uids["ai_urgent_3"]  # type: ignore[attr-defined]
    client, _ = client_for(env, "spec")
    study = next(s for s in client.get("/api/studies?limit=100").json()["studies"] if s["study_uid"] == uid)
    assert study["findings"] == [
        {"label": "Abnormal", "probability": 0.8, "threshold": 0.7, "urgent": False},
        {"label": "Effusion", "probability": 0.53, "threshold": 0.11, "urgent": True},
    ]
    row = client.get("/worklist/rows").text.split(f'data-study-uid="{uid}"')[1].split("</tr>")[0]
    assert 'class="finding finding-urgent" data-label="Effusion"' in row and "≥11%" in row

    assert main(["studies", "show", uid, "--data-dir", str(env.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "Why        AI: urgent finding" in out
    assert re.search(r"^Received   \d{4}-\d\d-\d\d \d\d:\d\d \(Asia/Ho_Chi_Minh\)$", out, re.M)
    assert "Rule       urgent: flagged urgent finding(s) Effusion" in out
    assert "  - Effusion: 0.530 >= threshold 0.110  (urgent finding)" in out
    assert "  - Abnormal: 0.800 >= threshold 0.700\n" in out


def test_why_names_a_tier_for_every_combination() -> None:
    for priority in ("urgent", "abnormal", "normal", None):
        for status in ("requested", "in_review", "answered", "closed", None):
            for urgency in ("routine", "urgent", "emergency", None):
                tier = why(priority, status, urgency)
                assert tier in TIERS
                if status in ("requested", "in_review") and urgency == "emergency":
                    assert tier == "emergency_consult"
