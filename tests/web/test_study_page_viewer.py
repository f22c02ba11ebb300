"""The specialist's study page (issue 16, items 6-9): pixel spacing in the viewer data,
a consult opened by a specialist, priors by DICOM StudyDate, and closing with an
unanswered question."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from web_helpers import WebEnv, add_station_row, add_user_row, client_for, make_web_env, store_dicom

DEV_07 = "dev_07_dx_pa_utf8_name.dcm"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("study-page"))
    add_station_row(env, "STATION1", "Trạm 1")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    return env


def _viewer_data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', html, re.S)
    assert match, html[:300]
    return json.loads(match.group(1))


def test_viewer_data_names_the_spacing_and_has_none_without_it(env: WebEnv, shared_dicom: Path) -> None:
    client, _ = client_for(env, "spec")
    with_ps, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", PixelSpacing=[0.2, 0.25])
    magnified, _ = store_dicom(
        env, shared_dicom / DEV_07, "STATION1", ImagerPixelSpacing=[0.3, 0.3], EstimatedRadiographicMagnificationFactor=1.5
    )
    none, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", ImagerPixelSpacing=None)  # an empty value
    spacing = _viewer_data(client.get(f"/studies/{with_ps}").text)["images"][0]["spacing"]
    assert spacing == {"row_mm": 0.2, "column_mm": 0.25, "source": "PixelSpacing", "magnification": None}
    spacing = _viewer_data(client.get(f"/studies/{magnified}").text)["images"][0]["spacing"]
    assert spacing["source"] == "ImagerPixelSpacing" and spacing["magnification"] == 1.5
    assert spacing["row_mm"] == pytest.approx(0.2)
    assert _viewer_data(client.get(f"/studies/{none}").text)["images"][0]["spacing"] is None


def test_priors_are_earlier_studies_only_labelled_with_the_study_date(env: WebEnv, shared_dicom: Path) -> None:
    client, _ = client_for(env, "spec")
    kw = {"PatientID": "PRIOR-1"}
    older, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", StudyDate="20240105", StudyTime="083000", **kw)
    same_day_before, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", StudyDate="20250310", StudyTime="070000", **kw)
    current, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", StudyDate="20250310", StudyTime="101500", **kw)
    # received after the ones above but acquired later than the current study: not a prior
    later, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1", StudyDate="20250402", StudyTime="090000", **kw)
    page = client.get(f"/studies/{current}").text
    priors = page[page.index('id="priors"') : page.index('id="tags"')]
    assert older in priors and same_day_before in priors
    assert later not in priors and f"/studies/{current}" not in priors
    assert "2024-01-05 08:30" in priors and "2025-03-10 07:00" in priors
    assert priors.index(same_day_before) < priors.index(older)  # newest first
    # The later study has both earlier ones (and the current one) as priors.
    later_priors = client.get(f"/studies/{later}").text
    assert current in later_priors[later_priors.index('id="priors"') :]


def _consult_id(client, uid: str) -> int:
    return client.get(f"/api/studies/{uid}/consults").json()["consults"][0]["id"]


def test_a_specialist_opens_a_consult_on_any_study(env: WebEnv, shared_dicom: Path) -> None:
    specialist, csrf = client_for(env, "spec")
    station, _ = client_for(env, "st1")
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    page = specialist.get(f"/studies/{uid}").text
    assert 'id="consult-request-form"' in page and "Open a consult on this study" in page
    form = {"question": "Xin chụp thêm phim nghiêng?", "urgency": "routine", "csrf_token": csrf}
    assert specialist.post(f"/studies/{uid}/consults", data=form, follow_redirects=False).status_code == 303
    consult = specialist.get(f"/api/studies/{uid}/consults").json()["consults"][0]
    assert consult["status"] == "in_review"
    assert "Xin chụp thêm phim nghiêng?" in station.get(f"/studies/{uid}/consult-panel").text


def test_closing_with_an_unanswered_question_needs_an_acknowledgement(env: WebEnv, shared_dicom: Path) -> None:
    station, station_csrf = client_for(env, "st1")
    specialist, spec_csrf = client_for(env, "spec")
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    station.post(f"/studies/{uid}/consults", data={"question": "Tràn dịch?", "urgency": "urgent", "csrf_token": station_csrf})
    consult = _consult_id(specialist, uid)
    panel = specialist.get(f"/studies/{uid}/consult-panel").text
    assert 'data-unanswered="1"' in panel and "has not been answered yet" in panel
    refused = specialist.post(f"/consults/{consult}/close", data={"csrf_token": spec_csrf}, follow_redirects=False)
    assert refused.status_code == 409 and "no answer yet" in refused.text
    assert specialist.get(f"/api/studies/{uid}/consults").json()["consults"][0]["status"] == "requested"
    # An answer, then the station's follow-up question: unanswered again.
    specialist.post(f"/consults/{consult}/messages", data={"body": "Không thấy.", "csrf_token": spec_csrf})
    assert 'data-unanswered="0"' in specialist.get(f"/studies/{uid}/consult-panel").text
    station.post(f"/consults/{consult}/messages", data={"body": "Cần chụp lại?", "csrf_token": station_csrf})
    refused = specialist.post(f"/consults/{consult}/close", data={"csrf_token": spec_csrf}, follow_redirects=False)
    assert refused.status_code == 409
    ok = specialist.post(
        f"/consults/{consult}/close",
        data={"csrf_token": spec_csrf, "acknowledge_unanswered": "1"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    assert specialist.get(f"/api/studies/{uid}/consults").json()["consults"][0]["status"] == "closed"


def test_the_asking_side_closes_its_own_question_after_confirming_only(env: WebEnv, shared_dicom: Path) -> None:
    station, station_csrf = client_for(env, "st1")
    uid, _ = store_dicom(env, shared_dicom / DEV_07, "STATION1")
    station.post(f"/studies/{uid}/consults", data={"question": "Gãy xương sườn?", "csrf_token": station_csrf})
    panel = station.get(f"/studies/{uid}/consult-panel").text
    assert 'data-unanswered="0"' in panel and "Close this consult?" in panel
    consult = _consult_id(station, uid)
    assert station.post(f"/consults/{consult}/close", data={"csrf_token": station_csrf}, follow_redirects=False).status_code == 303
