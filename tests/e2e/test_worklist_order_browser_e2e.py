"""Issue 16 items 1-2 in a real headless Chromium: the worklist's order and its "why".

A worklist of mixed cases (``worklist_cases``: an emergency consult on an AI-normal study,
six AI-urgent studies without consult, an urgent request, closed and answered emergencies...)
served by the real web app on uvicorn, read by Debian's ``/usr/bin/chromium`` at 1440x900
(specialist's desk) and 390x844 (station doctor's phone), in Vietnamese and English. The
order, each row's tier text and the urgent finding marks are read from the rendered page;
screenshots go to ``test-artifacts/screenshots/safety/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web_helpers import PASSWORD, add_station_row, add_user_row, make_web_env, serve_app
from worklist_cases import EXPECTED, store_cases

from consult_web.i18n import translate
from e2e_helpers import PROJECT_ROOT, browser_login
from xray_triage.settings import DEFAULT_MODEL_DIR

pytestmark = [pytest.mark.browser]

SHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots" / "safety"
WAIT_MS = 30_000
VIEWPORTS = [(1440, 900), (390, 844)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path) -> Iterator[tuple[str, dict[str, str]]]:
    env = make_web_env(tmp_path_factory.mktemp("order-browser"), model_dir=DEFAULT_MODEL_DIR)
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_user_row(env, "tram1", "station", "STATION1", language="vi")
    add_user_row(env, "spec_vi", "specialist", language="vi")
    add_user_row(env, "spec_en", "specialist", language="en")
    uids = store_cases(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1", "tram1")
    with serve_app(env.app) as base:
        yield base, uids
    env.db.dispose()


@pytest.mark.parametrize("language", ["vi", "en"])
def test_worklist_order_and_why_in_chromium(browser: Any, site: tuple[str, dict[str, str]], language: str) -> None:
    base, uids = site
    names = {uid: name for name, uid in uids.items()}
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width, height in VIEWPORTS:
        context = browser.new_context(viewport={"width": width, "height": height})
        page = browser_login(context.new_page(), base, f"spec_{language}", PASSWORD, WAIT_MS)
        page.wait_for_selector("tr[data-why]", timeout=WAIT_MS)
        rows = page.locator("tr[data-why]")
        found = [(names[r.get_attribute("data-study-uid")], r.get_attribute("data-why")) for r in rows.all()]
        assert found == EXPECTED
        first = rows.nth(0)
        assert first.locator(".why").inner_text().strip() == translate(language, "why.emergency_consult")
        assert first.locator(".why").is_visible()
        assert rows.nth(1).locator(".why").inner_text().strip() == translate(language, "why.urgent_consult")
        urgent_row = page.locator(f'tr[data-study-uid="{uids["ai_urgent_3"]}"]')
        assert urgent_row.locator(".why").inner_text().strip() == translate(language, "why.ai_urgent")
        mark = urgent_row.locator('.finding-urgent[data-label="Effusion"]')
        assert mark.count() == 1 and "53%" in mark.inner_text() and "11%" in mark.inner_text()
        page.screenshot(path=str(SHOTS / f"worklist-order-{language}-{width}x{height}.png"), full_page=True)
        context.close()
