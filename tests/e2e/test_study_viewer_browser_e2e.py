"""The specialist's study page in a real headless Chromium (issue 16, items 4-6, 8, 9).

At 1440x900 the whole film is inside the viewport with the findings beside it; ``?``
lists the keyboard shortcuts and a key switches the window preset; the measure tool
shows millimetres and names the spacing on a file with Pixel Spacing and refuses mm on
one without; closing an unanswered consult asks first. Screenshots at 1440x900 and
390x844, in Vietnamese and English, go to ``test-artifacts/screenshots/ux-viewer/``.

Debian's ``/usr/bin/chromium`` driven by playwright; a real ``xray-triage serve`` fed by storescu.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from e2e_helpers import (
    PROJECT_ROOT,
    browser_login,
    copy_with_new_uids,
    create_users,
    dcmodify,
    read_uids,
    store_ok,
)

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots" / "ux-viewer"
SPECIALIST, STATION_USER, PASSWORD = "chuyengia", "tram1", "mat-khau-that-dai-2026"
WAIT_MS = 30_000
WIDE = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


def _login(context: Any, base: str, username: str) -> Any:
    page = context.new_page()
    return browser_login(page, base, username, PASSWORD, WAIT_MS)


def _open_study(page: Any, base: str, uid: str) -> None:
    page.goto(f"{base}/studies/{uid}")
    page.wait_for_function(
        "() => { const i = document.querySelector('#viewer-image'); return i && i.getBoundingClientRect().height > 100; }",
        timeout=WAIT_MS,
    )


def _set_language(page: Any, code: str) -> None:
    page.click(f"#lang-{code}")
    page.wait_for_function(f"() => document.documentElement.lang === '{code}'", timeout=WAIT_MS)


def _measure(page: Any) -> str:
    page.keyboard.press("m")
    box = page.locator("#viewer-svg").bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 100, y, steps=4)
    page.mouse.move(x + 200, y, steps=4)
    page.mouse.up()
    return page.locator("#measure-readout").inner_text()


def test_specialist_study_page_at_1440x900_and_phone(
    browser: Any, launch_server: Any, shared_dicom: Path, tmp_path: Path
) -> None:
    server = launch_server.launch("viewer-ux")
    create_users(server.data_dir, [(SPECIALIST, "specialist", None, PASSWORD), (STATION_USER, "station", "STATION1", PASSWORD)])
    calibrated, bare, prior = copy_with_new_uids([shared_dicom / "dev_07_dx_pa_utf8_name.dcm"] * 3, tmp_path / "send")
    dcmodify("-i", "(0028,0030)=0.2\\0.25", "-m", "StudyDate=20250310", calibrated)
    dcmodify("-e", "(0018,1164)", "-m", "StudyDate=20250311", bare)
    dcmodify("-m", "StudyDate=20230102", "-m", "StudyTime=081500", prior)
    store_ok([prior, calibrated, bare], server.dicom_port)
    uids = [read_uids(p).study for p in (calibrated, bare, prior)]
    server.wait_final(uids)
    base = server.url("")
    SHOTS.mkdir(parents=True, exist_ok=True)

    context = browser.new_context(viewport=WIDE)
    page = _login(context, base, SPECIALIST)
    # 5: "n" / "p" walk the worklist in the order it was shown.
    order = [row.get_attribute("data-study-uid") for row in page.locator("#worklist-rows tr[data-study-uid]").all()]
    assert sorted(order) == sorted(uids), order
    page.locator(f'tr[data-study-uid="{order[0]}"] a.patient').click()
    page.wait_for_url(f"{base}/studies/{order[0]}", timeout=WAIT_MS)
    page.wait_for_selector("#viewer-svg", timeout=WAIT_MS)
    page.keyboard.press("n")
    page.wait_for_url(f"{base}/studies/{order[1]}", timeout=WAIT_MS)
    page.wait_for_selector("#viewer-svg", timeout=WAIT_MS)
    page.keyboard.press("p")
    page.wait_for_url(f"{base}/studies/{order[0]}", timeout=WAIT_MS)
    _open_study(page, base, uids[0])

    # 4: the whole film is inside the 1440x900 viewport, the findings beside it (not below).
    image = page.locator("#viewer-image").bounding_box()
    assert image["x"] >= 0 and image["y"] >= 0, image
    assert image["x"] + image["width"] <= 1440 and image["y"] + image["height"] <= 900, image
    findings = page.locator("#findings").bounding_box()
    assert findings["x"] >= image["x"] + image["width"] and findings["y"] < 900, (findings, image)
    heatmaps = page.locator("#heatmap-panel").bounding_box()
    assert heatmaps["x"] >= image["x"] + image["width"] and heatmaps["y"] < 900, (heatmaps, image)
    # 8: the prior is the earlier study, labelled with its DICOM StudyDate.
    priors = page.locator("#priors").inner_text()
    assert "2023-01-02 08:15" in priors and uids[1] not in page.locator("#priors").inner_html()
    page.screenshot(path=str(SHOTS / "study-1440x900-vi.png"))

    # 5: "?" lists the shortcuts; "2" switches to the lung preset.
    page.locator("body").click(position={"x": 5, "y": 5})
    page.keyboard.press("?")
    assert page.locator("#viewer-shortcuts").is_visible()
    page.screenshot(path=str(SHOTS / "shortcuts-1440x900-vi.png"))
    page.keyboard.press("Escape")
    assert not page.locator("#viewer-shortcuts").is_visible()
    page.keyboard.press("2")
    page.wait_for_selector('button[data-preset="lung"][aria-pressed="true"]', timeout=WAIT_MS)
    toggles = page.locator("input.heatmap-toggle")
    if toggles.count():  # the tiny model flags a finding with a heatmap: "h" shows it
        page.keyboard.press("h")
        assert toggles.first.is_checked() and page.locator(".heatmap-layer").first.is_visible()
        page.keyboard.press("h")
        assert not toggles.first.is_checked()

    # 6: millimetres with the spacing named (PixelSpacing 0.2 mm rows, 0.25 mm columns).
    readout = _measure(page)
    assert readout.endswith(" mm"), readout
    # 200 CSS px across on a 1024-column image shown about 620 px wide: ~330 columns x 0.25 mm.
    assert 40 < float(readout.split()[0]) < 140, readout
    assert "Pixel Spacing (0028,0030)" in page.locator("#viewer-spacing").inner_text()
    page.screenshot(path=str(SHOTS / "measure-1440x900-vi.png"))

    _set_language(page, "en")
    _open_study(page, base, uids[1])
    readout = _measure(page)
    assert "mm" not in readout.replace("no mm", "") and "px" in readout, readout
    assert "No pixel spacing" in page.locator("#viewer-spacing").inner_text()
    assert "mm" not in page.locator(".measure text").text_content().replace("no mm", "")
    page.screenshot(path=str(SHOTS / "measure-no-spacing-1440x900-en.png"))

    # 7 + 9: the specialist opens a consult on this study; the station answers nothing yet,
    # so the specialist's own question may be closed after a confirmation dialog.
    page.fill("#consult-question", "Please send a lateral view.")
    page.click("#consult-request")
    page.wait_for_selector('.consult-thread[data-status="in_review"]', timeout=WAIT_MS)
    messages: list[str] = []
    page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.dismiss()))
    page.click("#consult-close")
    page.wait_for_function("() => true")
    assert messages and "Close this consult?" in messages[0]
    assert page.locator('.consult-thread[data-status="in_review"]').count() == 1  # dismissed: still open
    _open_study(page, base, uids[0])
    page.screenshot(path=str(SHOTS / "study-1440x900-en.png"))
    context.close()

    # The phone layout belongs to ux-phone: this shows it is not broken by the wide-screen rules.
    for language in ("vi", "en"):
        phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
        page = _login(phone, base, SPECIALIST)
        if page.locator("html").get_attribute("lang") != language:
            _set_language(page, language)
        _open_study(page, base, uids[0])
        width = page.evaluate("() => document.documentElement.scrollWidth")
        image = page.locator("#viewer-image").bounding_box()
        assert image["width"] <= 390 and image["height"] > 100, image
        page.screenshot(path=str(SHOTS / f"study-390x844-{language}.png"), full_page=True)
        assert width <= 430, width  # no wide-screen rule leaks into the phone layout
        phone.close()
    server.stop_cleanly()
