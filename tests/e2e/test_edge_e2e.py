"""Edge -> centre over a bad link: two real ``xray-triage serve`` processes and the fault proxy between them.

The edge (the island station's server) has an ``images`` destination pointing at
the proxy, which forwards to the centre's DICOM port at a small rate, goes down,
and cuts an association in the middle of a C-STORE. The station doctor must get
every AI result at the edge while the link is down; once it is back every image
must reach the centre exactly once, the urgent study's images first.

Images are 64x64 copies of two shared files, so 50 of them are ~0.5 MB and the
throttled link still finishes in seconds. With the tiny test model
(tests/onnx_factory.py: brighter -> higher) and the thresholds below, copies of
``dev_01`` are urgent (Pneumothorax 0.90 >= 0.85) and copies of ``dev_07`` normal
(every finding below its threshold).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from e2e_helpers import CALLED_AE, SHARED_DICOM, check_cli, create_users, query, run_cli, store_ok, web_login
from onnx_factory import write_tiny_model_dir
from xray_triage_tools.faultproxy import ProxyThread

pytestmark = pytest.mark.slow

URGENT_SOURCE = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"
ROUTINE_SOURCE = SHARED_DICOM / "dev_07_dx_pa_utf8_name.dcm"
THRESHOLDS = {"Abnormal": 0.75, "Effusion": 0.95, "Pneumothorax": 0.85}
URGENT_IMAGES = 5  # one urgent study
ROUTINE_STUDIES, ROUTINE_IMAGES_PER_STUDY = 9, 5  # 45 routine images
LINK_RATE = 128_000  # bytes/s each way (~1 Mbit/s): a few seconds for the ~0.6 MB
CUT_AFTER_BYTES = 25_000  # inside the urgent study's third image
DEADLINE_S = 120.0
EDGE_ENV = {  # small back-off and timeouts, so the edge notices the link's return within a second
    "XRAY_TRIAGE_DELIVERY_RETRY_INITIAL_S": "0.2",
    "XRAY_TRIAGE_DELIVERY_RETRY_MAX_S": "1",
    "XRAY_TRIAGE_DELIVERY_POLL_S": "0.2",
    "XRAY_TRIAGE_DELIVERY_TIMEOUT_S": "10",
}


def small_study(source: Path, out_dir: Path, count: int, prefix: str) -> list[Path]:
    """``count`` 64x64 images of one new study and series, decimated from ``source`` (native pixels)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source)
    pixels = template.pixel_array[::16, ::16].copy()
    study, series = generate_uid(), generate_uid()
    files = []
    for n in range(count):
        ds = pydicom.dcmread(source)
        ds.PixelData = pixels.tobytes()
        ds.Rows, ds.Columns = pixels.shape
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{prefix}-{n:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def wait_until(condition, what: str, deadline_s: float = DEADLINE_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.1)


DOCTOR_PASSWORD = "island-doctor-password"
WAITING = re.compile(r"(\d+) (?:images waiting to be sent to|ảnh đang chờ gửi đến) centre")


def waiting_banner(client: httpx.Client) -> str | None:
    """The count in the worklist's "N images waiting to be sent to centre" status (en or vi), or None."""
    page = client.get("/worklist")
    assert page.status_code == 200, page.text[:300]
    match = WAITING.search(page.text)
    return match.group(1) if match else None


def centre_rows(centre_data: Path) -> list[tuple[str, str]]:
    """(SOP Instance UID, Study Instance UID) of every instance at the centre, in the order received."""
    return [
        (r["sop_instance_uid"], r["study_instance_uid"])
        for r in query(
            centre_data,
            "SELECT i.sop_instance_uid, st.study_instance_uid FROM instances i "
            "JOIN series se ON se.id = i.series_id JOIN studies st ON st.id = se.study_id "
            "ORDER BY i.received_at, i.id",
        )
    ]


@pytest.fixture(scope="module")
def edge_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("edge-model")
    write_tiny_model_dir(directory, thresholds=THRESHOLDS)
    return directory


def test_edge_to_centre_over_a_bad_link(launch_server, edge_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if run_cli("destinations", "--help").returncode != 0:
        pytest.skip("needs `xray-triage destinations` (durable delivery, branch delivery)")
    urgent = small_study(URGENT_SOURCE, tmp_path / "urgent", URGENT_IMAGES, "urgent")
    routine = [
        f
        for k in range(ROUTINE_STUDIES)
        for f in small_study(ROUTINE_SOURCE, tmp_path / f"routine{k}", ROUTINE_IMAGES_PER_STUDY, f"r{k}")
    ]
    urgent_study = str(pydicom.dcmread(urgent[0], stop_before_pixels=True).StudyInstanceUID)
    study_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in urgent + routine}
    sop_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in urgent + routine}
    assert len(sop_uids) == 50

    # The centre accepts the edge's calling AE title (its own AE title, the default) as a station.
    centre = launch_server.launch("centre", model=edge_model, stations=[(CALLED_AE, "Island edge", None)])
    with ProxyThread("127.0.0.1", centre.dicom_port, rate=LINK_RATE) as link:
        link.go_down()
        edge = launch_server.launch("edge", model=edge_model, env=EDGE_ENV, start=False)
        check_cli(
            "destinations",
            "add",
            "centre",
            "--ae-title",
            CALLED_AE,
            "--host",
            "127.0.0.1",
            "--port",
            str(link.port),
            "--send",
            "images",
            "--data-dir",
            edge.data_dir,
        )
        create_users(edge.data_dir, [("island_doctor", "station", "STATION1", DOCTOR_PASSWORD)])
        edge.start()
        doctor = web_login(edge.url(""), "island_doctor", DOCTOR_PASSWORD)
        # Routine studies first, the urgent one last: arrival order alone would send it last.
        store_ok(routine, edge.dicom_port)
        store_ok(urgent, edge.dicom_port)

        # Link down: every image is triaged at the edge all the same, and the edge keeps trying.
        studies = edge.wait_final(study_uids)
        priorities = {uid: s.get("priority") for uid, s in studies.items()}
        assert priorities.pop(urgent_study) == "urgent", studies[urgent_study]
        assert set(priorities.values()) == {"normal"}, priorities
        assert all(s["ai_status"] == "done" for s in studies.values())
        wait_until(lambda: link.stats().refused >= 1, "the edge to try the centre while the link is down")
        assert centre_rows(centre.data_dir) == []
        assert waiting_banner(doctor) == "50", "the station page says what is waiting"

        # Link back, then cut in the middle of a C-STORE and down again for a while.
        link.restore()
        link.cut_after(CUT_AFTER_BYTES, then_down=True)
        wait_until(lambda: link.stats().cuts >= 1, "the cut mid-transfer")
        # Cut inside the urgent study (at most two whole images passed), and the link is down again.
        assert len(centre_rows(centre.data_dir)) < URGENT_IMAGES
        time.sleep(0.5)  # the edge meets the dead link again (not a timing assertion)
        link.restore()

        wait_until(
            lambda: len(centre_rows(centre.data_dir)) >= 50,
            "all 50 images at the centre\n" + edge.log_tail() + "\n" + centre.log_tail(),
        )
        stats = link.stats()
        wait_until(lambda: waiting_banner(doctor) is None, "the waiting banner to go once all is sent")

    rows = centre_rows(centre.data_dir)
    assert len(rows) == 50 and {sop for sop, _ in rows} == sop_uids, "each image exactly once at the centre"
    assert query(centre.data_dir, "SELECT COUNT(*) AS n FROM quarantined_instances")[0]["n"] == 0
    first = [study for _, study in rows[:URGENT_IMAGES]]
    assert first == [urgent_study] * URGENT_IMAGES, f"urgent study first, got the order {first}"
    assert stats.cuts >= 1 and stats.refused >= 1
