"""The station doctor's phone (issue 16, items 10, 11, 13) in a real headless Chromium.

A station doctor on a 390×844 phone sees the worklist without sideways scrolling (patient,
AI priority and consult status in view), requests a consult, and keeps the study page and
the worklist open; a specialist at 1440×900 answers. Without a reload the station's pages
show a notice, a marked title and (sound turned on) a WebAudio beep, and the worklist row
shows the conclusion. Finding names, age/sex and dates are in the user's language.
Screenshots at 390×844 and 1440×900 (vi and en) go to ``test-artifacts/screenshots/ux-phone/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_web_browser_e2e import ARTIFACTS, SPECIALIST, STATION_USER, WAIT_MS, _add_user, _login

from e2e_helpers import copy_with_new_uids, read_uids, store_ok

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SHOTS = ARTIFACTS / "screenshots" / "ux-phone"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1440, "height": 900}
NO_SIDEWAYS_SCROLL = "() => document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth"


def _shot(page: Any, name: str) -> Path:
    from PIL import Image, ImageStat

    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("L")
    assert image.width == page.viewport_size["width"], f"{path}: the page is wider than the screen"
    assert ImageStat.Stat(image).stddev[0] > 10, f"{path}: looks blank"
    return path


def _in_view_horizontally(page: Any, selector: str) -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None and box["width"] > 0, selector
    assert box["x"] >= 0 and box["x"] + box["width"] <= page.viewport_size["width"] + 0.5, (selector, box)


def test_station_phone_sees_the_reply_arrive(browser: Any, launch_server: Any, tmp_path: Path, shared_dicom: Path) -> None:  # noqa: F811
    from onnx_factory import write_tiny_model_dir

    (tmp_path / "model").mkdir()
    write_tiny_model_dir(tmp_path / "model", thresholds={"Abnormal": 0.0, "Effusion": 0.0, "Pneumothorax": 0.0})
    server = launch_server.launch("phone-ux", model=tmp_path / "model")
    _add_user(server.data_dir, STATION_USER, "station", "--station", "STATION1", "--name", "BS. Trạm Thạnh An")
    _add_user(server.data_dir, SPECIALIST, "specialist", "--name", "BS. Chuyên khoa", "--language", "en")
    (study_file,) = copy_with_new_uids([shared_dicom / "dev_07_dx_pa_utf8_name.dcm"], tmp_path / "send")
    store_ok([study_file], server.dicom_port)
    uid = read_uids(study_file).study
    server.wait_final([uid])
    base = server.url("")
    row = f'tr[data-study-uid="{uid}"]'

    # --- the station doctor's phone, in Vietnamese -------------------------------------------
    # a Vietnamese phone: its locale also sets how the date fields of the filter show dates
    phone = browser.new_context(viewport=PHONE, device_scale_factor=1, is_mobile=True, has_touch=True, locale="vi-VN")
    worklist = _login(phone, base, STATION_USER)
    assert worklist.evaluate(NO_SIDEWAYS_SCROLL)
    for part in (f"{row} a.patient", f"{row} .badge", f"{row} .col-consult"):
        _in_view_horizontally(worklist, part)
        assert worklist.locator(part).is_visible()
    assert worklist.locator(f"{row} .badge").inner_text() == "Khẩn"
    assert worklist.locator(f"{row} .col-age").inner_text() == "61 tuổi, Nữ"  # DICOM 061Y, F
    assert "Tràn dịch màng phổi" in worklist.locator(f"{row} .col-findings").inner_text()
    _shot(worklist, "worklist-phone-vi")

    study = phone.new_page()
    study.goto(f"{base}/studies/{uid}")
    study.fill("#consult-question", "Ho, sốt 2 tuần. Có tràn dịch màng phổi không?")
    study.click("#consult-request")
    study.wait_for_selector('.consult-thread[data-status="requested"]', timeout=WAIT_MS)
    study.wait_for_function(
        "() => { const i = document.querySelector('#viewer-image'); return i && (i.getAttribute('href') || '').length > 0; }",
        timeout=WAIT_MS,
    )
    assert study.evaluate(NO_SIDEWAYS_SCROLL)
    # The image fills the stage (no black bands above or below it), and the consult follows it.
    svg = study.locator("#viewer-svg").bounding_box()
    stage = study.locator("#viewer-stage").bounding_box()
    ratio = float(study.locator("#viewer-image").get_attribute("height")) / float(study.locator("#viewer-image").get_attribute("width"))
    assert svg is not None and stage is not None and svg["width"] > 300
    assert abs(svg["height"] - svg["width"] * ratio) < 4 and abs(stage["height"] - svg["height"]) < 4, (svg, stage, ratio)
    consult = study.locator("#consult").bounding_box()
    findings = study.locator("#findings").bounding_box()
    assert consult is not None and findings is not None and consult["y"] < findings["y"]  # the reply before the AI table
    assert "61 tuổi, Nữ" in study.locator(".study-head").inner_text()
    tags = study.locator("#tags").inner_text()
    assert "09/11/2025" in tags and "14:49" in tags  # StudyDate 20251109, StudyTime 144931: the page's formats
    study.click("#sound-toggle")  # sound is off by default; the doctor turns it on
    assert study.locator("#sound-toggle").get_attribute("aria-pressed") == "true"
    study.evaluate("() => { window.xrt.lastBeep = 0; }")
    title_before = study.title()
    for page in (worklist, study):  # both pages listen before the specialist acts
        page.wait_for_selector("body[data-live=live]", timeout=WAIT_MS)
    assert study.locator("#reply-notice").is_hidden()

    # --- the specialist at 1440×900, in English --------------------------------------------
    desk = browser.new_context(viewport=DESKTOP, locale="en-US")
    specialist = _login(desk, base, SPECIALIST)
    assert "Pleural effusion" in specialist.locator(f"{row} .col-findings").inner_text()
    assert specialist.locator(f"{row} .col-age").inner_text() == "61 y, Female"
    _shot(specialist, "worklist-desktop-en")
    specialist.goto(f"{base}/studies/{uid}")
    specialist.click("#consult-claim")
    specialist.wait_for_selector('.consult-thread[data-status="in_review"]', timeout=WAIT_MS)
    specialist.fill("#reply-body", "Tràn dịch màng phổi trái lượng vừa. Chuyển bệnh viện huyện.")
    specialist.click("#reply-submit")
    specialist.wait_for_selector('.consult-thread[data-status="answered"]', timeout=WAIT_MS)
    specialist.select_option("#conclusion-select", "refer_hospital")
    # A live refresh of the consult panel (its own reply's event can land just now) keeps the
    # chosen conclusion: it once put the select back to "normal" before "Send" was pressed.
    specialist.evaluate("() => window.xrt.refresh(document.getElementById('consult-panel'))")
    assert specialist.locator("#conclusion-select").input_value() == "refer_hospital"
    specialist.click("#conclusion-submit")
    specialist.wait_for_selector("[id^=consult-conclusion-]", timeout=WAIT_MS)
    _shot(specialist, "study-desktop-en")

    # --- the station's open pages learn of it without a reload -------------------------------
    study.wait_for_selector("#reply-notice:not([hidden])", timeout=WAIT_MS)
    assert "Bác sĩ chuyên khoa đã trả lời" in study.locator("#reply-notice").inner_text()
    assert study.title() != title_before and study.title().startswith("(") and "Có trả lời mới" in study.title()
    study.wait_for_selector('.consult-thread[data-status="answered"] .message.reply', timeout=WAIT_MS)
    study.wait_for_function("() => window.xrt.lastBeep > 0", timeout=WAIT_MS)  # the WebAudio beep was played
    reply = study.locator(".message.reply").last
    reply.scroll_into_view_if_needed()
    assert reply.is_visible() and "Chuyển bệnh viện huyện" in reply.inner_text()
    assert "Bác sĩ chuyên khoa" in reply.inner_text()  # the same role name as in the top bar
    _shot(study, "study-phone-vi-answered")

    worklist.wait_for_selector("#reply-notice:not([hidden])", timeout=WAIT_MS)
    worklist.wait_for_function(
        f"() => (document.querySelector('{row} .row-conclusion') || {{}}).textContent === 'Kết luận: Chuyển bệnh viện'",
        timeout=WAIT_MS,
    )
    assert worklist.locator("#reply-notice-open").get_attribute("href") == f"/studies/{uid}"
    assert worklist.evaluate(NO_SIDEWAYS_SCROLL)
    _shot(worklist, "worklist-phone-vi-answered")
    worklist.click("#reply-notice-dismiss")
    assert worklist.locator("#reply-notice").is_hidden() and not worklist.title().startswith("(")

    # --- the same pages at 1440×900 (vi), and the phone in English ----------------------------
    worklist.set_viewport_size(DESKTOP)
    _shot(worklist, "worklist-desktop-vi")
    study.set_viewport_size(DESKTOP)
    _shot(study, "study-desktop-vi")
    specialist.set_viewport_size(PHONE)
    specialist.goto(f"{base}/worklist")
    assert specialist.evaluate(NO_SIDEWAYS_SCROLL)
    assert specialist.locator(f"{row} .row-conclusion").inner_text() == "Conclusion: Refer to hospital"
    _in_view_horizontally(specialist, f"{row} .col-consult")
    _shot(specialist, "worklist-phone-en")
    specialist.goto(f"{base}/studies/{uid}")
    assert specialist.evaluate(NO_SIDEWAYS_SCROLL)
    _shot(specialist, "study-phone-en")
    phone.close()
    desk.close()
