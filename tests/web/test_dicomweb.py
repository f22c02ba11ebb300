"""DICOMweb under /dicomweb through the test client: QIDO matching and paging, WADO-RS
instances, metadata, frames and rendered, STOW-RS, and the station rule everywhere.

The real client (dicomweb-client) and Orthanc talk to a server process in
tests/e2e/test_dicomweb_e2e.py; these tests pin the details fast, on studies stored
through the real Ingestor from the shared sample files.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from web_helpers import add_station_row, add_user_row, client_for, make_web_env, store_dicom

from e2e_helpers import SHARED_DICOM
from xray_triage.store.users import create_api_token

EXPLICIT = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"
JPEG_LS = SHARED_DICOM / "dev_04_cr_pa_rescale_jpegls.dcm"
UTF8_NAME = SHARED_DICOM / "dev_07_dx_pa_utf8_name.dcm"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    env = make_web_env(tmp_path_factory.mktemp("dicomweb"))
    for ae in ("STATION1", "STATION2"):
        add_station_row(env, ae)
    add_user_row(env, "admin", "admin")
    add_user_row(env, "st1", "station", "STATION1")
    add_user_row(env, "doc", "specialist")
    uids = {
        "a": store_dicom(env, EXPLICIT, "STATION1", PatientID="PID-A", PatientName="Nguyen^Van^A",
                         StudyDate="20240105", AccessionNumber="ACC1"),
        "b": store_dicom(env, JPEG_LS, "STATION1", PatientID="PID-B", PatientName="Tran^Thi^B",
                         StudyDate="20240220", AccessionNumber="ACC2"),
        "c": store_dicom(env, EXPLICIT, "STATION2", PatientID="PID-C", PatientName="Le^C",
                         StudyDate="20240301", AccessionNumber="ACC3", Modality="CR"),
    }  # fmt: skip
    env.uids = uids  # type: ignore[attr-defined]
    with env.db.session() as session:
        env.tokens = {u: create_api_token(session, u) for u in ("admin", "st1", "doc")}  # type: ignore[attr-defined]
    return env


def _client(env, username: str = "admin") -> TestClient:  # type: ignore[no-untyped-def]
    client = TestClient(env.app, base_url="http://testserver")
    client.headers["Authorization"] = f"Bearer {env.tokens[username]}"
    return client


def _value(obj: dict, tag: str):  # type: ignore[no-untyped-def]
    values = obj.get(tag, {}).get("Value")
    return values[0] if values else None


def _study_uids(response) -> set[str]:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    return {_value(s, "0020000D") for s in response.json()}


def _parts(response) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    header = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + response.content)
    assert message.get_content_type() == "multipart/related"
    return [(p["Content-Type"], p.get_payload(decode=True)) for p in message.iter_parts()]


def test_qido_matching_keys(env) -> None:  # type: ignore[no-untyped-def]
    a, b, c = (env.uids[k][0] for k in "abc")
    admin = _client(env)
    assert _study_uids(admin.get("/dicomweb/studies")) == {a, b, c}
    assert _study_uids(admin.get("/dicomweb/studies", params={"PatientID": "PID-B"})) == {b}
    assert _study_uids(admin.get("/dicomweb/studies", params={"00100020": "PID-?"})) == {a, b, c}
    assert _study_uids(admin.get("/dicomweb/studies", params={"PatientName": "nguyen*"})) == {a}
    assert _study_uids(admin.get("/dicomweb/studies", params={"PatientName": "*Thi*"})) == {b}
    assert _study_uids(admin.get("/dicomweb/studies", params={"StudyDate": "20240201-20240331"})) == {b, c}
    assert _study_uids(admin.get("/dicomweb/studies", params={"StudyDate": "-20240131"})) == {a}
    assert _study_uids(admin.get("/dicomweb/studies", params={"StudyDate": "20240301-"})) == {c}
    assert _study_uids(admin.get("/dicomweb/studies", params={"AccessionNumber": "ACC2"})) == {b}
    assert _study_uids(admin.get("/dicomweb/studies", params={"StudyInstanceUID": f"{a},{c}"})) == {a, c}
    modality_of_b = pydicom.dcmread(JPEG_LS, stop_before_pixels=True).Modality
    expected = {u for u, m in ((a, "DX"), (b, modality_of_b), (c, "CR")) if m == "CR"}
    assert _study_uids(admin.get("/dicomweb/studies", params={"ModalitiesInStudy": "CR"})) == expected
    assert admin.get("/dicomweb/studies", params={"StudyDate": "2024-01-05-"}).status_code == 400
    assert admin.get("/dicomweb/studies", params={"NoSuchKey": "1"}).status_code == 400
    ignored = admin.get("/dicomweb/studies", params={"ReferringPhysicianName": "x"})
    assert ignored.status_code == 200 and "ReferringPhysicianName" in ignored.headers["warning"]


def test_qido_study_attributes_paging_and_includefield(env) -> None:  # type: ignore[no-untyped-def]
    admin = _client(env)
    a = env.uids["a"][0]
    (study,) = admin.get("/dicomweb/studies", params={"PatientID": "PID-A"}).json()
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Nguyen^Van^A"}]}
    assert _value(study, "00201206") == 1 and _value(study, "00201208") == 1
    assert study["00080061"]["Value"] == ["DX"]
    assert _value(study, "00081190") == f"http://testserver/dicomweb/studies/{a}"
    first = admin.get("/dicomweb/studies", params={"limit": 2})
    assert len(first.json()) == 2 and "additional results" in first.headers["warning"]
    rest = admin.get("/dicomweb/studies", params={"limit": 2, "offset": 2})
    assert len(rest.json()) == 1 and "warning" not in rest.headers
    assert _study_uids(first) | _study_uids(rest) == {env.uids[k][0] for k in "abc"}
    series = admin.get(f"/dicomweb/studies/{a}/series", params={"includefield": "all"}).json()
    assert len(series) == 1 and _value(series[0], "00080060") == "DX"
    assert _value(series[0], "0020000D") == a  # includefield=all adds the study's attributes
    series_uid = _value(series[0], "0020000E")
    instances = admin.get(f"/dicomweb/studies/{a}/series/{series_uid}/instances").json()
    assert [_value(i, "00080018") for i in instances] == [env.uids["a"][1]]
    assert _value(instances[0], "00280010") == pydicom.dcmread(EXPLICIT, stop_before_pixels=True).Rows


def test_station_user_sees_only_its_station_everywhere(env) -> None:  # type: ignore[no-untyped-def]
    station = _client(env, "st1")
    a, b, c = (env.uids[k] for k in "abc")
    assert _study_uids(station.get("/dicomweb/studies")) == {a[0], b[0]}
    assert station.get("/dicomweb/studies", params={"PatientID": "PID-C"}).json() == []
    assert station.get(f"/dicomweb/studies/{c[0]}/series").json() == []
    assert station.get("/dicomweb/instances", params={"SOPInstanceUID": c[1]}).json() == []
    series_c = _value(_client(env).get(f"/dicomweb/studies/{c[0]}/series").json()[0], "0020000E")
    base = f"/dicomweb/studies/{c[0]}/series/{series_c}/instances/{c[1]}"
    for path in (f"/dicomweb/studies/{c[0]}", f"/dicomweb/studies/{c[0]}/metadata", base, base + "/metadata",
                 base + "/frames/1", base + "/rendered", f"/studies/{c[0]}/images/{c[1]}/render"):  # fmt: skip
        assert station.get(path).status_code == 404, path
        assert _client(env).get(path).status_code == 200, path


def test_tokens_work_on_the_render_route_and_unknown_users_get_401(env) -> None:  # type: ignore[no-untyped-def]
    study, sop = env.uids["a"]
    render = _client(env, "st1").get(f"/studies/{study}/images/{sop}/render", follow_redirects=False)
    assert render.status_code == 200 and render.headers["content-type"] == "image/jpeg"
    anonymous = TestClient(env.app, base_url="http://testserver")
    assert anonymous.get("/dicomweb/studies").status_code == 401
    bad = anonymous.get("/dicomweb/studies", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    page = _client(env).get("/worklist", follow_redirects=False)  # HTML pages still need a login
    assert page.status_code == 303


def test_session_cookie_works_for_dicomweb(env) -> None:  # type: ignore[no-untyped-def]
    client, _csrf = client_for(env, "st1")
    assert _study_uids(client.get("/dicomweb/studies")) == {env.uids["a"][0], env.uids["b"][0]}


def _series_of(env, key: str) -> str:  # type: ignore[no-untyped-def]
    study = env.uids[key][0]
    return _value(_client(env).get(f"/dicomweb/studies/{study}/series").json()[0], "0020000E")


def test_wado_instance_is_the_stored_file_byte_for_byte(env) -> None:  # type: ignore[no-untyped-def]
    study, sop = env.uids["b"]
    series = _series_of(env, "b")
    response = _client(env).get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    ((content_type, payload),) = _parts(response)
    stored = next((env.data_dir / "dicom" / study).rglob(f"{sop}.dcm")).read_bytes()
    assert payload == stored
    assert str(pydicom.dcmread(JPEG_LS).file_meta.TransferSyntaxUID) in content_type
    whole_study = _parts(_client(env).get(f"/dicomweb/studies/{study}"))
    assert [p for _, p in whole_study] == [stored]
    refused = _client(env).get(
        f"/dicomweb/studies/{study}",
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
        },
    )
    assert refused.status_code == 406


def test_metadata_is_the_file_as_dicom_json_with_pixel_data_as_bulk_data(env) -> None:  # type: ignore[no-untyped-def]
    study, sop = env.uids["a"]
    series = _series_of(env, "a")
    (meta,) = _client(env).get(f"/dicomweb/studies/{study}/metadata").json()
    assert _value(meta, "00080018") == sop
    assert meta["7FE00010"]["BulkDataURI"].endswith(f"/instances/{sop}/frames/1")
    assert _value(meta, "00083002") == str(pydicom.dcmread(EXPLICIT).file_meta.TransferSyntaxUID)
    same = _client(env).get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata").json()
    assert same == [meta]


def test_frames_uncompressed_and_as_stored(env) -> None:  # type: ignore[no-untyped-def]
    admin = _client(env)
    study, sop = env.uids["a"]
    url = f"/dicomweb/studies/{study}/series/{_series_of(env, 'a')}/instances/{sop}/frames/1"
    ((ctype, raw),) = _parts(
        admin.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    )
    source = pydicom.dcmread(EXPLICIT)
    assert raw == source.PixelData and "application/octet-stream" in ctype
    assert admin.get(url.replace("/frames/1", "/frames/2")).status_code == 404
    study, sop = env.uids["b"]
    url = f"/dicomweb/studies/{study}/series/{_series_of(env, 'b')}/instances/{sop}/frames/1"
    jls = pydicom.dcmread(JPEG_LS)
    stored_ts = str(jls.file_meta.TransferSyntaxUID)
    as_stored = admin.get(
        url, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    )
    ((ctype, data),) = _parts(as_stored)
    assert stored_ts in ctype
    assert data == next(pydicom.encaps.generate_frames(jls.PixelData, number_of_frames=1))
    decoded = admin.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    ((ctype, data),) = _parts(decoded)
    assert "1.2.840.10008.1.2.1" in ctype
    pixels = jls.pixel_array
    assert np.array_equal(
        np.frombuffer(data, dtype=pixels.dtype.newbyteorder("<")).reshape(pixels.shape), pixels
    )


def test_rendered_with_window_and_viewport(env) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    study, sop = env.uids["a"]
    url = f"/dicomweb/studies/{study}/series/{_series_of(env, 'a')}/instances/{sop}/rendered"
    admin = _client(env)
    jpeg = admin.get(url, params={"viewport": "256,256"})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(jpeg.content)).size) == 256
    png = admin.get(
        url, params={"viewport": "128,128", "window": "1000,500,linear"}, headers={"Accept": "image/png"}
    )
    assert png.headers["content-type"] == "image/png"
    narrow = np.asarray(Image.open(io.BytesIO(png.content)))
    wide = np.asarray(
        Image.open(
            io.BytesIO(
                admin.get(
                    url,
                    params={"viewport": "128,128", "window": "1000,100000"},
                    headers={"Accept": "image/png"},
                ).content
            )
        )
    )
    assert narrow.std() > wide.std()  # a narrow window spreads the values
    assert admin.get(url, params={"window": "1,2,sigmoid"}).status_code == 400


def _stow_body(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "xrtboundary0123456789"
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
            for f in files
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _new_copy(path: Path, **tags: object) -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


def test_stow_stores_through_the_ingest_path_and_reports_each_failure(env) -> None:  # type: ignore[no-untyped-def]
    good, ds = _new_copy(EXPLICIT)
    cut, cut_ds = _new_copy(EXPLICIT)
    body, ctype = _stow_body([good, cut[:-1000], b"not dicom at all"])
    station = _client(env, "st1")
    response = station.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert response.status_code == 202, response.text
    result = response.json()
    (stored,) = result["00081199"]["Value"]
    assert _value(stored, "00081155") == ds.SOPInstanceUID
    assert _value(stored, "00081190").endswith(f"/instances/{ds.SOPInstanceUID}")
    failed = result["00081198"]["Value"]
    assert [_value(f, "00081197") for f in failed] == [0xA900, 0xC000]
    assert _value(failed[0], "00081155") == cut_ds.SOPInstanceUID
    # Filed under the station user's own station, byte for byte, and queued for triage.
    assert _study_uids(
        station.get("/dicomweb/studies", params={"StudyInstanceUID": ds.StudyInstanceUID})
    ) == {ds.StudyInstanceUID}
    stored_file = next((env.data_dir / "dicom" / ds.StudyInstanceUID).rglob("*.dcm"))
    assert stored_file.read_bytes() == good
    with env.db.read_session() as session:
        from xray_triage.store.schema import Instance, TriageJob

        instance = session.query(Instance).filter_by(sop_instance_uid=ds.SOPInstanceUID).one()
        assert instance.calling_ae == "STATION1"
        assert session.query(TriageJob).filter_by(instance_id=instance.id).count() == 1


def test_stow_refusals(env) -> None:  # type: ignore[no-untyped-def]
    good, _ds = _new_copy(EXPLICIT)
    body, ctype = _stow_body([good])
    assert (
        _client(env, "doc")
        .post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        .status_code
        == 403
    )
    wrong_study = _client(env).post(
        f"/dicomweb/studies/{generate_uid()}", content=body, headers={"Content-Type": ctype}
    )
    assert (
        wrong_study.status_code == 409
        and _value(wrong_study.json()["00081198"]["Value"][0], "00081197") == 0xA900
    )
    not_multipart = _client(env).post(
        "/dicomweb/studies", content=good, headers={"Content-Type": "application/dicom"}
    )
    assert not_multipart.status_code == 415
    client, _ = client_for(env, "admin")  # a session cookie without the CSRF token: refused
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 403
