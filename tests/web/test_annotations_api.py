"""Annotation JSON API and the viewer's page data, through FastAPI's test client.

Covers: create/list/edit/delete by the author, audit rows for each change, the
author-only rule (403), station isolation (404), strict geometry validation (422),
CSRF, and that a hostile label is returned verbatim as JSON but never becomes markup
in the study page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from web_helpers import (
    WebEnv,
    add_station_row,
    add_user_row,
    client_for,
    make_web_env,
    store_dicom,
    triage_all,
)

from consult_web.viewer import viewer_strings
from e2e_helpers import PROJECT_ROOT
from xray_triage.store.consult_schema import AuditEvent
from xray_triage.store.schema import Instance, TriageResult
from xray_triage.store.users import create_api_token

XSS = "<img src=x onerror=alert(1)>"
ROOT = PROJECT_ROOT / "consult_web"
VIEWER_DATA = re.compile(r'<script type="application/json" id="viewer-data">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("annotations"), model_dir=tiny_model)
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_station_row(env, "STATION2", "Trạm Y tế Cần Giờ")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "st1vi", "station", "STATION1", language="vi")
    add_user_row(env, "st2", "station", "STATION2")
    add_user_row(env, "spec", "specialist")
    add_user_row(env, "spec2", "specialist")
    env.study1, env.sop1 = store_dicom(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")  # type: ignore[attr-defined]
    env.study2, env.sop2 = store_dicom(env, shared_dicom / "dev_01_dx_pa_explicit_window.dcm", "STATION2")  # type: ignore[attr-defined]
    triage_all(env)
    return env


@pytest.fixture(scope="module")
def clients(env: WebEnv) -> dict[str, tuple[TestClient, str]]:
    return {name: client_for(env, name) for name in ("st1", "st1vi", "st2", "spec", "spec2")}


def _list_url(study_uid: str) -> str:
    return f"/api/studies/{study_uid}/annotations"


def _post(client_csrf: tuple[TestClient, str], study_uid: str, body: dict[str, Any], **kwargs: Any):  # type: ignore[no-untyped-def]
    client, csrf = client_csrf
    return client.post(_list_url(study_uid), json=body, headers={"X-CSRF-Token": csrf}, **kwargs)


def _rect(env: WebEnv, **overrides: Any) -> dict[str, Any]:
    body = {
        "instance_uid": env.sop1,  # type: ignore[attr-defined]
        "kind": "rect",
        "geometry": {"x": 100, "y": 120.5, "w": 200, "h": 150},
        "label": "opacity",
        "color": "#FF0000",
    }
    return {**body, **overrides}


def _audit_actions(env: WebEnv, annotation_id: int) -> list[str]:
    with env.db.session() as session:
        events = session.query(AuditEvent).filter(AuditEvent.action.like("annotation.%")).order_by(AuditEvent.id)
        return [e.action for e in events if e.detail.get("annotation_id") == annotation_id]


def test_author_creates_lists_edits_and_deletes(env: WebEnv, clients: dict) -> None:
    spec_client, spec_csrf = clients["spec"]
    created = _post(clients["spec"], env.study1, _rect(env))  # type: ignore[attr-defined]
    assert created.status_code == 201, created.text
    mark = created.json()
    assert mark["kind"] == "rect" and mark["instance_uid"] == env.sop1  # type: ignore[attr-defined]
    assert mark["geometry"] == {"x": 100.0, "y": 120.5, "w": 200.0, "h": 150.0}
    assert mark["color"] == "#ff0000" and mark["author"] == "spec" and mark["can_edit"] is True
    assert mark["created_at"] and mark["author_id"]

    seen_by_station = clients["st1"][0].get(_list_url(env.study1)).json()["annotations"]  # type: ignore[attr-defined]
    ours = next(a for a in seen_by_station if a["id"] == mark["id"])
    assert ours["author"] == "spec" and ours["can_edit"] is False and ours["label"] == "opacity"

    patch = spec_client.patch(
        f"/api/annotations/{mark['id']}",
        json={"label": "right upper lobe opacity", "geometry": {"x": 10, "y": 10, "w": 5, "h": 5}, "color": "#00ff00"},
        headers={"X-CSRF-Token": spec_csrf},
    )
    assert patch.status_code == 200, patch.text
    edited = patch.json()
    assert edited["label"] == "right upper lobe opacity" and edited["color"] == "#00ff00"
    assert edited["geometry"] == {"x": 10.0, "y": 10.0, "w": 5.0, "h": 5.0}
    assert edited["updated_at"] >= edited["created_at"]

    deleted = spec_client.delete(f"/api/annotations/{mark['id']}", headers={"X-CSRF-Token": spec_csrf})
    assert deleted.status_code == 204
    remaining = spec_client.get(_list_url(env.study1)).json()["annotations"]  # type: ignore[attr-defined]
    assert mark["id"] not in [a["id"] for a in remaining]
    assert spec_client.delete(f"/api/annotations/{mark['id']}", headers={"X-CSRF-Token": spec_csrf}).status_code == 404
    assert _audit_actions(env, mark["id"]) == ["annotation.create", "annotation.update", "annotation.delete"]


@pytest.mark.parametrize(
    ("kind", "geometry", "label"),
    [
        ("ellipse", {"cx": 512, "cy": 400, "rx": 80, "ry": 40.5}, ""),
        ("arrow", {"x1": 0, "y1": 0, "x2": 1024, "y2": 1024}, "look here"),
        ("freehand", {"points": [[1, 2], [3.5, 4], [10, 20]]}, ""),
        ("text", {"x": 500, "y": 500}, "Tràn dịch màng phổi?"),
        ("rect", {"x": -40, "y": -40, "w": 1100, "h": 1100}, ""),  # within the 5 % margin
    ],
)
def test_every_kind_can_be_drawn_by_a_station_doctor_on_its_own_study(
    env: WebEnv, clients: dict, kind: str, geometry: dict, label: str
) -> None:
    body = {"instance_uid": env.sop1, "kind": kind, "geometry": geometry, "label": label}  # type: ignore[attr-defined]
    response = _post(clients["st1"], env.study1, body)  # type: ignore[attr-defined]
    assert response.status_code == 201, response.text
    mark = response.json()
    assert mark["label"] == label and mark["color"] == "#ffd400"
    if kind == "freehand":
        assert mark["geometry"] == {"points": [[1.0, 2.0], [3.5, 4.0], [10.0, 20.0]]}


def test_only_the_author_may_edit_or_delete(env: WebEnv, clients: dict) -> None:
    mark = _post(clients["spec"], env.study1, _rect(env)).json()  # type: ignore[attr-defined]
    for other in ("spec2", "st1"):
        client, csrf = clients[other]
        patch = client.patch(f"/api/annotations/{mark['id']}", json={"label": "mine now"}, headers={"X-CSRF-Token": csrf})
        assert patch.status_code == 403, (other, patch.text)
        delete = client.delete(f"/api/annotations/{mark['id']}", headers={"X-CSRF-Token": csrf})
        assert delete.status_code == 403, (other, delete.text)
    listed = clients["spec"][0].get(_list_url(env.study1)).json()["annotations"]  # type: ignore[attr-defined]
    assert next(a for a in listed if a["id"] == mark["id"])["label"] == "opacity"


def test_a_station_never_reaches_another_stations_annotations(env: WebEnv, clients: dict) -> None:
    mark = _post(clients["spec"], env.study1, _rect(env)).json()  # type: ignore[attr-defined]
    client, csrf = clients["st2"]
    assert client.get(_list_url(env.study1)).status_code == 404  # type: ignore[attr-defined]
    assert _post(clients["st2"], env.study1, _rect(env)).status_code == 404  # type: ignore[attr-defined]
    headers = {"X-CSRF-Token": csrf}
    assert client.patch(f"/api/annotations/{mark['id']}", json={"label": "x"}, headers=headers).status_code == 404
    assert client.delete(f"/api/annotations/{mark['id']}", headers=headers).status_code == 404
    # Its own study's image UID under another study's URL is not a way in either.
    wrong = _post(clients["st2"], env.study2, _rect(env, instance_uid=env.sop1))  # type: ignore[attr-defined]
    assert wrong.status_code == 404
    anonymous = TestClient(env.app)
    assert anonymous.get(_list_url(env.study1)).status_code == 401  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"geometry": {"x": 5000, "y": 10, "w": 10, "h": 10}}, "out of bounds"),
        ({"geometry": {"x": -60, "y": 10, "w": 10, "h": 10}}, "beyond the margin"),
        ({"geometry": {"x": 900, "y": 10, "w": 300, "h": 10}}, "extends past the edge"),
        ({"geometry": {"x": 1, "y": 1, "w": 0, "h": 10}}, "zero width"),
        ({"geometry": {"x": 1, "y": 1, "w": -5, "h": 10}}, "negative width"),
        ({"geometry": {"x": "1", "y": 1, "w": 5, "h": 10}}, "string number"),
        ({"geometry": {"x": True, "y": 1, "w": 5, "h": 10}}, "boolean number"),
        ({"geometry": {"x": 1, "y": 1, "w": 5}}, "missing h"),
        ({"geometry": {"x": 1, "y": 1, "w": 5, "h": 5, "z": 1}}, "extra key"),
        ({"geometry": {"cx": 1, "cy": 1, "rx": 5, "ry": 5}}, "ellipse geometry for a rect"),
        ({"geometry": [1, 2, 3, 4]}, "not an object"),
        ({"kind": "circle"}, "unknown kind"),
        ({"kind": "text", "geometry": {"x": 5, "y": 5}, "label": ""}, "text without label"),
        ({"kind": "text", "geometry": {"x": 5, "y": 5}, "label": "   "}, "text with a blank label"),
        ({"kind": "freehand", "geometry": {"points": [[1, 1]]}}, "one point"),
        ({"kind": "freehand", "geometry": {"points": [[1, 1]] * 5001}}, "too many points"),
        ({"kind": "freehand", "geometry": {"points": [[1, 1, 1], [2, 2, 2]]}}, "3-D points"),
        ({"label": "x" * 501}, "label too long"),
        ({"color": "red"}, "named colour"),
        ({"color": "#12345"}, "short colour"),
        ({"instance_uid": ""}, "no instance"),
        ({"author_id": 1}, "unknown field"),
    ],
)
def test_invalid_annotations_are_rejected(env: WebEnv, clients: dict, overrides: dict, why: str) -> None:
    response = _post(clients["spec"], env.study1, _rect(env, **overrides))  # type: ignore[attr-defined]
    assert response.status_code == 422, (why, response.status_code, response.text)
    assert "detail" in response.json()


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_rejected(env: WebEnv, clients: dict, number: str) -> None:
    """Python's JSON parser accepts NaN/Infinity; the API must not store them."""
    client, csrf = clients["spec"]
    body = json.dumps(_rect(env)).replace('"x": 100', f'"x": {number}')
    assert number in body
    response = client.post(
        _list_url(env.study1),  # type: ignore[attr-defined]
        content=body,
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text


def test_invalid_edits_are_rejected(env: WebEnv, clients: dict) -> None:
    client, csrf = clients["spec"]
    headers = {"X-CSRF-Token": csrf}
    rect = _post(clients["spec"], env.study1, _rect(env)).json()  # type: ignore[attr-defined]
    text = _post(
        clients["spec"], env.study1, _rect(env, kind="text", geometry={"x": 5, "y": 5}, label="note")  # type: ignore[attr-defined]
    ).json()
    url = f"/api/annotations/{rect['id']}"
    assert client.patch(url, json={}, headers=headers).status_code == 422
    assert client.patch(url, json={"geometry": {"x": 1, "y": 1, "w": 5000, "h": 5}}, headers=headers).status_code == 422
    assert client.patch(url, json={"geometry": {"points": [[1, 1], [2, 2]]}}, headers=headers).status_code == 422
    assert client.patch(url, json={"kind": "text"}, headers=headers).status_code == 422
    assert client.patch(url, json={"color": "blue"}, headers=headers).status_code == 422
    assert client.patch(f"/api/annotations/{text['id']}", json={"label": ""}, headers=headers).status_code == 422
    assert client.patch("/api/annotations/999999", json={"label": "x"}, headers=headers).status_code == 404


def test_changes_need_the_csrf_token(env: WebEnv, clients: dict) -> None:
    client, csrf = clients["spec"]
    assert client.post(_list_url(env.study1), json=_rect(env)).status_code == 403  # type: ignore[attr-defined]
    bad = client.post(_list_url(env.study1), json=_rect(env), headers={"X-CSRF-Token": "forged"})  # type: ignore[attr-defined]
    assert bad.status_code == 403
    mark = _post(clients["spec"], env.study1, _rect(env)).json()  # type: ignore[attr-defined]
    url = f"/api/annotations/{mark['id']}"
    assert client.patch(url, json={"label": "x"}).status_code == 403
    assert client.delete(url).status_code == 403
    assert client.delete(url, headers={"X-CSRF-Token": csrf}).status_code == 204


def test_api_tokens_need_no_csrf(env: WebEnv) -> None:
    with env.db.session() as session:
        token = create_api_token(session, "spec2", "test")
    client = TestClient(env.app)
    response = client.post(_list_url(env.study1), json=_rect(env), headers={"Authorization": f"Bearer {token}"})  # type: ignore[attr-defined]
    assert response.status_code == 201, response.text
    assert response.json()["author"] == "spec2"


def test_a_hostile_label_stays_text(env: WebEnv, clients: dict) -> None:
    mark = _post(clients["spec"], env.study1, _rect(env, label=XSS)).json()  # type: ignore[attr-defined]
    assert mark["label"] == XSS
    listed = clients["st1"][0].get(_list_url(env.study1)).json()["annotations"]  # type: ignore[attr-defined]
    assert next(a for a in listed if a["id"] == mark["id"])["label"] == XSS
    page = clients["st1"][0].get(f"/studies/{env.study1}")  # type: ignore[attr-defined]
    assert page.status_code == 200
    assert XSS not in page.text
    assert "\\u003cimg src=x onerror=alert(1)\\u003e" in page.text
    data = json.loads(VIEWER_DATA.search(page.text).group(1))
    assert XSS in [a["label"] for a in data["annotations"]]


def test_study_page_carries_the_viewer_data(env: WebEnv, clients: dict) -> None:
    client, _ = clients["st1vi"]
    page = client.get(f"/studies/{env.study1}")  # type: ignore[attr-defined]
    assert page.status_code == 200
    for hook in ('id="viewer-svg"', 'id="viewer-image"', 'id="tool-rect"', 'id="zoom-in"', 'data-preset="lung"',
                 'id="heatmap-opacity"'):  # fmt: skip
        assert hook in page.text, hook
    assert "Hình chữ nhật" in page.text and "Trung thất" in page.text  # Vietnamese user, Vietnamese tools
    data = json.loads(VIEWER_DATA.search(page.text).group(1))
    image = data["images"][0]
    assert image["sop_uid"] == env.sop1 and (image["rows"], image["columns"]) == (1024, 1024)  # type: ignore[attr-defined]
    assert data["can_annotate"] is True and data["presets"] == ["dicom", "lung", "mediastinum", "bone"]
    assert data["i18n"]["viewer.zoom"] == "Thu phóng"
    first = client.get(image["first_url"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert client.get(image["windows_url"]).status_code == 200
    assert client.get(data["annotations_url"]).status_code == 200


def test_viewer_data_has_a_heatmap_per_flagged_label(env: WebEnv, clients: dict) -> None:
    grid = [[0.0, 0.5], [1.0, 0.25]]
    with env.db.session() as session:
        instance = session.query(Instance).filter(Instance.sop_instance_uid == env.sop1).one()  # type: ignore[attr-defined]
        result = session.query(TriageResult).filter(TriageResult.instance_id == instance.id).one()
        label, other = list(result.probabilities)[:2]
        result.flagged = [label, other]
        result.heatmaps = {label: {"grid": grid, "box": [0, 0, 1024, 1024]}}  # `other` has no map: skipped
    page = clients["spec"][0].get(f"/studies/{env.study1}")  # type: ignore[attr-defined]
    maps = json.loads(VIEWER_DATA.search(page.text).group(1))["images"][0]["heatmaps"]
    assert [m["label"] for m in maps] == [label]
    assert maps[0]["grid"] == grid and maps[0]["box"] == [0, 0, 1024, 1024]
    assert 0 <= maps[0]["probability"] <= 1 and 0 <= maps[0]["threshold"] <= 1


def test_viewer_strings_exist_in_both_languages() -> None:
    vi = json.loads((ROOT / "locales" / "vi" / "viewer.json").read_text(encoding="utf-8"))
    en = json.loads((ROOT / "locales" / "en" / "viewer.json").read_text(encoding="utf-8"))
    assert set(vi) == set(en) and all(k.startswith("viewer.") for k in en)
    assert all(vi[k].strip() for k in vi) and vi["viewer.delete"] == "Xoá" and vi["viewer.opacity"] == "Độ mờ"
    used = set(re.findall(r"""t\(\s*['"](viewer\.[\w.]+)['"]""", (ROOT / "templates" / "_viewer.html").read_text()))
    used |= set(re.findall(r"""['"](viewer\.[\w.]+)['"]""", (ROOT / "static" / "viewer.js").read_text()))
    assert used and used <= set(en), sorted(used - set(en))
    assert viewer_strings("vi")["viewer.heatmap"] == "Bản đồ nhiệt AI"
