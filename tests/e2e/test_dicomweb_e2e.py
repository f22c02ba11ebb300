"""DICOMweb with real clients against a real ``xray-triage serve``: dicomweb-client and Orthanc.

dcmtk's storescu sends one study from each of two stations. dicomweb-client (Python)
searches, retrieves the instance (its data set byte for byte what storescu sent), its
metadata and a rendered JPEG, and stores a new instance with STOW-RS, which is then
triaged like any received image. A station user's token sees only its station, through
QIDO-RS, WADO-RS and the viewer's render route. Orthanc (Debian ``orthanc`` +
``orthanc-dicomweb``, a plain process) has our ``/dicomweb/`` as its DICOMweb server
``xrt``: it lists our studies and retrieves one into its own store.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orthanc_dicomweb_helpers import orthanc_with_dicomweb_server, require_orthanc_dicomweb
from pydicom.uid import generate_uid

from e2e_helpers import (
    STATION1,
    copy_with_new_uids,
    create_users,
    dataset_bytes,
    http,
    meta_group_end,
    read_uids,
    store_ok,
)

pytestmark = [pytest.mark.slow]

STATION2 = "STATION2"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SAMPLE = "dev_01_dx_pa_explicit_window.dcm"


def _client(server: Any, token: str) -> Any:
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(server.url("/dicomweb"), headers={"Authorization": f"Bearer {token}"})


def _uid(obj: dict[str, Any], tag: str) -> str:
    return obj[tag]["Value"][0]


def _wait_for_made_objects(client: Any, study_uid: str, deadline_s: float = 120.0) -> list[dict[str, Any]]:
    """The study's instances of the SOP classes this server makes, once both AI objects are filed."""
    deadline = time.monotonic() + deadline_s
    while True:
        made = [
            i
            for i in client.search_for_instances(study_uid)
            if _uid(i, "00080016") in (COMPREHENSIVE_SR, GSPS)
        ]
        if len(made) >= 2:
            return made
        assert time.monotonic() < deadline, (
            f"no AI SR + GSPS served for {study_uid} after {deadline_s} s: {made}"
        )
        time.sleep(0.5)


def _instance_part(server: Any, token: str, study: str, series: str, sop: str) -> bytes:
    """The WADO-RS instance answer's one part, read with the standard library's MIME parser."""
    url = server.url(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    response = http.get(
        url,
        headers={"Authorization": f"Bearer {token}", "Accept": 'multipart/related; type="application/dicom"'},
    )
    assert response.status_code == 200, response.text
    header = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + response.content)
    (part,) = list(message.iter_parts())
    return part.get_payload(decode=True)


def test_dicomweb_client_and_orthanc_against_a_real_server(
    launch_server: Any, shared_dicom: Path, tmp_path: Path
) -> None:
    pytest.importorskip("dicomweb_client")  # the dev extra
    require_orthanc_dicomweb()
    from onnx_factory import write_tiny_model_dir

    model = tmp_path / "flagging-model"  # every finding flagged: each image gets an AI SR and GSPS
    write_tiny_model_dir(model, thresholds={"Abnormal": 0.0, "Effusion": 0.0, "Pneumothorax": 0.0})
    server = launch_server.launch("dicomweb", model=model, stations=[(STATION2, "Station 2", None)])
    tokens = create_users(
        server.data_dir,
        [
            ("dw-admin", "admin", None, "dw-admin-password-1"),
            ("dw-station", "station", STATION1, "dw-station-pw-12"),
        ],
    )
    own, other = copy_with_new_uids([shared_dicom / SAMPLE, shared_dicom / SAMPLE], tmp_path / "sent")
    store_ok([own], server.dicom_port, aet=STATION1)
    store_ok([other], server.dicom_port, aet=STATION2)
    own_uids, other_uids = read_uids(own), read_uids(other)

    # dicomweb-client, as an admin: search at every level, retrieve, metadata, rendered.
    admin = _client(server, tokens["dw-admin"])
    studies = {_uid(s, "0020000D") for s in admin.search_for_studies()}
    assert {own_uids.study, other_uids.study} <= studies
    assert [
        _uid(s, "0020000D")
        for s in admin.search_for_studies(
            search_filters={"PatientID": pydicom.dcmread(own).PatientID, "StudyInstanceUID": own_uids.study}
        )
    ] == [own_uids.study]
    assert (
        _uid(admin.search_for_series(own_uids.study)[0], "0020000E") == own_uids.series
    )  # the image's first
    (instance,) = admin.search_for_instances(own_uids.study, own_uids.series)
    assert _uid(instance, "00080018") == own_uids.sop
    retrieved = admin.retrieve_instance(own_uids.study, own_uids.series, own_uids.sop)
    assert retrieved.SOPInstanceUID == own_uids.sop
    part = _instance_part(server, tokens["dw-admin"], own_uids.study, own_uids.series, own_uids.sop)
    assert part[meta_group_end(part) :] == dataset_bytes(own)  # the data set storescu sent, byte for byte
    metadata = admin.retrieve_instance_metadata(own_uids.study, own_uids.series, own_uids.sop)
    assert _uid(metadata, "00080018") == own_uids.sop and "BulkDataURI" in metadata["7FE00010"]
    frames = admin.retrieve_instance_frames(own_uids.study, own_uids.series, own_uids.sop, [1])
    assert frames[0] == pydicom.dcmread(own).PixelData
    rendered = admin.retrieve_instance_rendered(
        own_uids.study,
        own_uids.series,
        own_uids.sop,
        media_types=("image/jpeg",),
        params={"viewport": "200,200"},
    )
    from PIL import Image

    assert max(Image.open(io.BytesIO(rendered)).size) == 200

    # Our own AI SR and GSPS (filed in the study once triaged) are searched and served like any instance.
    made = _wait_for_made_objects(admin, own_uids.study)
    assert {_uid(i, "00080016") for i in made} >= {COMPREHENSIVE_SR, GSPS}
    sr = next(i for i in made if _uid(i, "00080016") == COMPREHENSIVE_SR)
    sr_series = sr["00081190"]["Value"][0].split("/series/")[1].split("/")[0]
    sr_ds = admin.retrieve_instance(own_uids.study, sr_series, _uid(sr, "00080018"))
    assert sr_ds.SOPClassUID == COMPREHENSIVE_SR and sr_ds.StudyInstanceUID == own_uids.study
    modalities = admin.search_for_studies(search_filters={"StudyInstanceUID": own_uids.study})[0]["00080061"][
        "Value"
    ]
    assert {"DX", "SR", "PR"} <= set(modalities)

    # The station user's token: its own station only, through QIDO, WADO and the render route.
    station = _client(server, tokens["dw-station"])
    assert {_uid(s, "0020000D") for s in station.search_for_studies()} == {own_uids.study}
    assert station.search_for_series(other_uids.study) == []
    from requests import HTTPError

    with pytest.raises(HTTPError) as refused:
        station.retrieve_instance(other_uids.study, other_uids.series, other_uids.sop)
    assert refused.value.response.status_code == 404
    bearer = {"Authorization": f"Bearer {tokens['dw-station']}"}
    render = "/studies/{}/images/{}/render"
    assert (
        http.get(server.url(render.format(own_uids.study, own_uids.sop)), headers=bearer).status_code == 200
    )
    assert (
        http.get(server.url(render.format(other_uids.study, other_uids.sop)), headers=bearer).status_code
        == 404
    )

    # STOW-RS of a new instance by the station user: stored under its station, then triaged.
    new = pydicom.dcmread(shared_dicom / SAMPLE)
    new.StudyInstanceUID, new.SeriesInstanceUID, new.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    result = station.store_instances([new])
    assert len(result.ReferencedSOPSequence) == 1 and not result.get("FailedSOPSequence")
    triaged = server.wait_final([new.StudyInstanceUID])[new.StudyInstanceUID]
    assert triaged["ai_status"] == "done", triaged
    assert {_uid(s, "0020000D") for s in station.search_for_studies()} == {
        own_uids.study,
        new.StudyInstanceUID,
    }

    # Orthanc with our server as its DICOMweb server "xrt": list, then retrieve one study.
    with orthanc_with_dicomweb_server(
        tmp_path / "orthanc", server.url("/dicomweb/"), tokens["dw-admin"]
    ) as orthanc:
        listed = orthanc.post("/dicom-web/servers/xrt/qido", {"Uri": "/studies"})
        # Orthanc's own answer format: {"0020000D": {"Name": "StudyInstanceUID", "Value": "1.2...", ...}}
        assert {own_uids.study, other_uids.study} <= {s["0020000D"]["Value"] for s in listed}, listed
        orthanc.post("/dicom-web/servers/xrt/retrieve", {"Resources": [{"Study": own_uids.study}]})
        found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": own_uids.sop}})
        assert len(found) == 1, orthanc.log()
        copy = orthanc.rest.get(f"/instances/{found[0]}/file").content
        assert pydicom.dcmread(io.BytesIO(copy)).SOPInstanceUID == own_uids.sop
        assert copy[meta_group_end(copy) :] == dataset_bytes(own)
