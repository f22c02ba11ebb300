"""The consult report's link on the study page, in a real headless Chromium against ``xray-triage serve``.

dcmtk's storescu sends a study with a Vietnamese patient name. A specialist (English, 1440x900)
and a station doctor (Vietnamese, 390x844 phone) open the study page: the download link is
visible inside the viewport, in the user's language, and the PDF it points to downloads with
the browser's own session (``page.request``); a station user of another station gets 404 for it.
The page is also shown with print media, where the navigation, tools and forms are hidden.
Screenshots go to ``test-artifacts/screenshots/report/``.

Chromium is Debian's ``/usr/bin/chromium`` driven by Python playwright; no browser is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_web_browser_e2e import PASSWORD, _add_user

from e2e_helpers import PROJECT_ROOT, STATION1, browser_login, copy_with_new_uids, read_uids, store_ok

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SHOTS = PROJECT_ROOT / "test-artifacts" / "screenshots" / "report"
STATION2 = "STATION2"
WAIT_MS = 30_000


def _login(browser: Any, base: str, username: str, width: int, height: int) -> Any:
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    return browser_login(page, base, username, PASSWORD, WAIT_MS)


def _link_in_view(page: Any, width: int) -> str:
    link = page.locator("#report-download")
    link.scroll_into_view_if_needed()
    box = link.bounding_box()
    assert box is not None and box["width"] > 40 and box["height"] >= 20, box
    assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"the report link runs off a {width} px screen: {box}"
    return str(link.get_attribute("href"))


def _download(page: Any, base: str, href: str) -> bytes:
    response = page.request.get(f"{base}{href}")  # the browser's own session cookie
    assert response.status == 200, response.status
    assert response.headers["content-type"] == "application/pdf"
    body = response.body()
    assert body.startswith(b"%PDF-") and len(body) > 20_000
    return body


def test_study_page_offers_the_report_at_desktop_and_phone_sizes(
    browser: Any, launch_server: Any, shared_dicom: Path, tmp_path: Path
) -> None:
    server = launch_server.launch("report-browser", stations=[(STATION2, "Trạm Y tế Cần Giờ", None)])
    _add_user(server.data_dir, "tram1", "station", "--station", STATION1, "--name", "BS. Trạm Thạnh An")
    _add_user(server.data_dir, "tram2", "station", "--station", STATION2)
    _add_user(server.data_dir, "chuyengia", "specialist", "--name", "BS. Chuyên khoa", "--language", "en")
    study = copy_with_new_uids([shared_dicom / "dev_07_dx_pa_utf8_name.dcm"], tmp_path / "send")[0]
    store_ok([study], server.dicom_port)
    study_uid = read_uids(study).study
    server.wait_final([study_uid])
    base = server.url("")
    SHOTS.mkdir(parents=True, exist_ok=True)

    # The specialist at 1440x900, in English.
    specialist = _login(browser, base, "chuyengia", 1440, 900)
    specialist.goto(f"{base}/studies/{study_uid}")
    specialist.wait_for_selector("#viewer-svg", timeout=WAIT_MS)
    assert specialist.locator("#report-download").inner_text() == "Download report (PDF)"
    href = _link_in_view(specialist, 1440)
    assert href == f"/studies/{study_uid}/report.pdf?lang=en"
    specialist.screenshot(path=str(SHOTS / "study-link-1440x900-en.png"))
    _download(specialist, base, href)
    _download(specialist, base, str(specialist.locator("#report-download-other").get_attribute("href")))  # vi

    # Printing the page: no navigation, tools or forms; the patient and the image stay.
    specialist.emulate_media(media="print")
    assert not specialist.locator(".topbar").is_visible()
    assert not specialist.locator("#report-download").is_visible()
    assert not specialist.locator(".viewer-toolbar").is_visible()
    assert specialist.locator("#patient-name").is_visible() and specialist.locator("#viewer-svg").is_visible()
    specialist.screenshot(path=str(SHOTS / "study-print-1440x900-en.png"), full_page=True)

    # The station doctor on a 390x844 phone, in Vietnamese.
    station = _login(browser, base, "tram1", 390, 844)
    station.goto(f"{base}/studies/{study_uid}")
    assert station.locator("#report-download").inner_text() == "Tải báo cáo (PDF)"
    href = _link_in_view(station, 390)
    assert href == f"/studies/{study_uid}/report.pdf?lang=vi"
    station.screenshot(path=str(SHOTS / "study-link-390x844-vi.png"))
    _download(station, base, href)

    # Another station's doctor: the same 404 as for a study that does not exist.
    other = _login(browser, base, "tram2", 390, 844)
    assert other.request.get(f"{base}{href}").status == 404
