"""The typed web layer: the API's OpenAPI document, its response models and the permissions module.

- ``/api/openapi.json`` is a valid OpenAPI 3 document (checked with openapi-spec-validator)
  of the JSON API routes only, served to logged-in users (401 otherwise, like the API);
- the response models change nothing in what the API sends: each answer is byte for byte
  what its data source (``store.queries``, ``consults.annotations``, ``pipeline.render``)
  gives, encoded as a plain JSON answer, and the schema's properties are the answer's keys;
- who may do what is answered by ``consult_web.permissions`` for every role.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from pydantic import ValidationError
from web_helpers import (
    WebEnv,
    add_station_row,
    add_user_row,
    client_for,
    make_web_env,
    store_dicom,
    triage_all,
)

from consult_web import permissions, schemas
from consult_web.deps import urgent_labels
from xray_triage.consults.annotations import annotations_of
from xray_triage.pipeline.render import DEFAULT_SIZE, image_cache, windows_info
from xray_triage.store.queries import get_study, list_studies
from xray_triage.store.schema import Instance, Study
from xray_triage.store.users import AuthUser, create_api_token

ROUTES = Path(__file__).resolve().parents[1] / "consult_web" / "routes"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, shared_dicom: Path) -> WebEnv:
    env = make_web_env(tmp_path_factory.mktemp("api-schema"), model_dir=tiny_model)
    add_station_row(env, "STATION1", "Trạm Y tế Thạnh An")
    add_station_row(env, "STATION2", "Trạm Y tế Cần Giờ")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "spec", "specialist")
    add_user_row(env, "admin", "admin")
    env.study1, env.sop1 = store_dicom(env, shared_dicom / "dev_07_dx_pa_utf8_name.dcm", "STATION1")  # type: ignore[attr-defined]
    env.study2, env.sop2 = store_dicom(env, shared_dicom / "dev_01_dx_pa_explicit_window.dcm", "STATION2")  # type: ignore[attr-defined]
    triage_all(env)
    station, csrf = client_for(env, "st1")
    uid = env.study1  # type: ignore[attr-defined]
    station.post(f"/studies/{uid}/consults", data={"question": "Tràn dịch?", "urgency": "urgent", "csrf_token": csrf})
    mark = {"instance_uid": env.sop1, "kind": "rect", "geometry": {"x": 1, "y": 1, "w": 5, "h": 5}, "label": "nốt"}  # type: ignore[attr-defined]
    assert station.post(f"/api/studies/{uid}/annotations", json=mark, headers={"X-CSRF-Token": csrf}).status_code == 201
    specialist, spec_csrf = client_for(env, "spec")
    specialist.post("/consults/1/claim", data={"csrf_token": spec_csrf})
    specialist.post("/consults/1/messages", data={"body": "Có tràn dịch", "csrf_token": spec_csrf})
    return env


def _token_client(env: WebEnv, username: str) -> TestClient:
    with env.db.session() as session:
        token = create_api_token(session, username)
    return TestClient(env.app, headers={"Authorization": f"Bearer {token}"})


def _auth(env: WebEnv, username: str) -> AuthUser:
    from xray_triage.store.consult_schema import User

    with env.db.read_session() as session:
        row = session.query(User).filter(User.username == username).one()
        return AuthUser(row.id, row.username, row.display_name, row.role, row.station_ae, "en", "UTC")


def _plain_json(value: Any) -> bytes:
    """How a route returning this dict was answered before the response models (the reference)."""
    return JSONResponse(jsonable_encoder(value)).body


def test_openapi_document_is_served_to_logged_in_users_only(env: WebEnv) -> None:
    anonymous = TestClient(env.app).get("/api/openapi.json")
    assert anonymous.status_code == 401 and anonymous.json() == {"detail": "not authenticated"}
    assert TestClient(env.app, headers={"Authorization": "Bearer xrt_wrong"}).get("/api/openapi.json").status_code == 401
    browser, _ = client_for(env, "spec")
    assert browser.get("/api/openapi.json").status_code == 200
    response = _token_client(env, "st1").get("/api/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "script-src 'self'" in response.headers["content-security-policy"]  # no Swagger page, no inline JS
    assert browser.get("/api/docs").status_code == 404
    document = response.json()
    validate(document)  # a valid OpenAPI 3 document
    assert document["openapi"].startswith("3.")
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


def test_openapi_lists_the_api_routes_only_with_their_response_schemas(env: WebEnv) -> None:
    document = _token_client(env, "spec").get("/api/openapi.json").json()
    paths = document["paths"]
    assert all(path.startswith("/api/") for path in paths), sorted(paths)
    assert set(paths) == {
        "/api/studies",
        "/api/studies/{study_uid}",
        "/api/studies/{study_uid}/consults",
        "/api/studies/{study_uid}/annotations",
        "/api/annotations/{annotation_id}",
        "/api/studies/{study_uid}/images/{sop_uid}/windows",
    }
    schemas_ = document["components"]["schemas"]

    def response_schema(path: str, method: str = "get", status: str = "200") -> dict[str, Any]:
        ref = paths[path][method]["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        return schemas_[ref.rsplit("/", 1)[1]]

    page = response_schema("/api/studies")
    assert set(page["required"]) == {"studies", "total", "limit", "offset", "next_offset", "disclaimer"}
    assert page["properties"]["studies"]["items"]["$ref"].endswith("/StudySummary")
    assert {p["name"] for p in paths["/api/studies"]["get"]["parameters"]} == {"limit", "offset"}
    # The schema says what the API really sends: its properties are an answer's keys.
    client = _token_client(env, "spec")
    answer = client.get("/api/studies").json()
    assert set(page["properties"]) == set(answer)
    assert set(schemas_["StudySummary"]["properties"]) == set(answer["studies"][0])
    detail = client.get(f"/api/studies/{env.study1}").json()  # type: ignore[attr-defined]
    assert set(response_schema("/api/studies/{study_uid}")["properties"]) == set(detail)
    annotation = response_schema("/api/studies/{study_uid}/annotations", "post", "201")
    marks = client.get(f"/api/studies/{env.study1}/annotations").json()["annotations"]  # type: ignore[attr-defined]
    assert set(annotation["properties"]) == set(marks[0])
    assert "204" in paths["/api/annotations/{annotation_id}"]["delete"]["responses"]
    # Errors are documented as the app answers them: one readable string, not FastAPI's list.
    errors = paths["/api/studies"]["get"]["responses"]
    assert {"401", "404", "422"} <= set(errors)
    assert errors["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ApiError")
    invalid = client.get("/api/studies?limit=0")
    assert invalid.status_code == 422 and set(invalid.json()) <= set(schemas_["ApiError"]["properties"])
    assert isinstance(invalid.json()["detail"], str)


def test_api_answers_are_their_sources_json_byte_for_byte(env: WebEnv) -> None:
    """The models validate and pass the data on unchanged: same keys, order, nulls and numbers."""
    client = _token_client(env, "spec")
    spec = _auth(env, "spec")
    uid, sop = env.study1, env.sop1  # type: ignore[attr-defined]
    with env.db.read_session() as session:
        urgent = urgent_labels(env.app.state.card)
        studies = list_studies(session, limit=50, urgent_labels=urgent)
        detail = get_study(session, uid, urgent)
        study = session.query(Study).filter(Study.study_instance_uid == uid).one()
        marks = annotations_of(session, study, spec)
        file_path = session.query(Instance).filter(Instance.sop_instance_uid == sop).one().file_path
    assert detail is not None and marks and detail["images"][0]["result"] is not None  # the test has data to compare
    disclaimer = env.app.state.disclaimer
    page = {"studies": studies, "total": 2, "limit": 50, "offset": 0, "next_offset": None, "disclaimer": disclaimer}
    assert client.get("/api/studies").content == _plain_json(page)
    assert client.get(f"/api/studies/{uid}").content == _plain_json({**detail, "disclaimer": disclaimer})
    assert client.get(f"/api/studies/{uid}/annotations").content == _plain_json({"annotations": marks})
    settings = env.settings
    image = image_cache(settings.render_cache_images, settings.max_frame_pixels).get(
        Path(settings.data_dir) / file_path, size=DEFAULT_SIZE
    )
    assert client.get(f"/api/studies/{uid}/images/{sop}/windows").content == _plain_json(windows_info(image))


def test_consults_answer_keeps_its_shape(env: WebEnv) -> None:
    consults = _token_client(env, "st1").get(f"/api/studies/{env.study1}/consults").json()["consults"]  # type: ignore[attr-defined]
    [consult] = consults
    assert list(consult) == [
        "id", "status", "urgency", "question", "conclusion", "requested_by", "claimed_by",
        "created_at", "updated_at", "messages",
    ]  # fmt: skip
    assert (consult["status"], consult["urgency"], consult["question"]) == ("answered", "urgent", "Tràn dịch?")
    assert (consult["requested_by"], consult["claimed_by"], consult["conclusion"]) == ("st1", "spec", None)
    assert [(m["author"], m["body"]) for m in consult["messages"]] == [("spec", "Có tràn dịch")]
    assert list(consult["messages"][0]) == ["author", "body", "created_at"]
    assert consult["created_at"].endswith("+00:00")


def test_a_key_the_models_do_not_know_is_an_error_not_a_silent_drop() -> None:
    good = {"label": "Effusion", "probability": 0.7, "threshold": 0.5, "urgent": True}
    assert schemas.Finding.model_validate(good).model_dump() == good
    with pytest.raises(ValidationError):
        schemas.Finding.model_validate({**good, "new_key": 1})


@pytest.mark.parametrize(
    ("role", "station", "expected"),
    [
        ("station", "STATION1", {"admin": False, "all_stations": False, "specialist": False, "request": True, "own": True, "other": False}),
        ("specialist", None, {"admin": False, "all_stations": True, "specialist": True, "request": True, "own": True, "other": True}),
        ("admin", None, {"admin": True, "all_stations": True, "specialist": True, "request": True, "own": True, "other": True}),
    ],
)  # fmt: skip
def test_who_may_do_what_is_answered_by_the_permissions_module(
    role: str, station: str | None, expected: dict[str, bool]
) -> None:
    user = AuthUser(1, "u", "", role, station, "en", "UTC")
    own, other = Study(station_ae="STATION1"), Study(station_ae="STATION2")
    found = {
        "admin": permissions.is_admin(user),
        "all_stations": permissions.sees_all_stations(user),
        "specialist": permissions.is_specialist(user),
        "request": permissions.can_request(user),
        "own": permissions.can_see(user, own) and permissions.can_annotate(user, own),
        "other": permissions.can_see(user, other) and permissions.can_annotate(user, other),
    }
    assert found == expected


def test_only_admins_see_the_admin_link_and_reach_the_admin_page(env: WebEnv) -> None:
    for username, is_admin in (("st1", False), ("spec", False), ("admin", True)):
        client, _ = client_for(env, username)
        assert ('id="nav-admin"' in client.get("/worklist").text) is is_admin, username
        assert client.get("/admin").status_code == (200 if is_admin else 403), username


def test_routes_reach_the_app_only_through_typed_dependencies() -> None:
    """No route module reads the database from ``request.app.state`` or compares roles itself."""
    for module in sorted(ROUTES.glob("*.py")):
        source = module.read_text()
        assert "app.state.db" not in source, module.name
        assert "Depends(current_user)" not in source, module.name
        assert ".role ==" not in source and ".role !=" not in source and ".role in" not in source, module.name


def test_openapi_document_is_json_serialisable_once_and_reused(env: WebEnv) -> None:
    client = _token_client(env, "admin")
    first, second = client.get("/api/openapi.json"), client.get("/api/openapi.json")
    assert first.content == second.content
    assert json.loads(first.content)["info"]["title"] == "xray-triage API"
