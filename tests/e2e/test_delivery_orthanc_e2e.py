"""End to end: our server delivers to a real PACS (Debian's Orthanc) durably, at least once.

One server process and one Orthanc process (``tests/orthanc_helpers.py``), a destination added
with ``xray-triage destinations add``, images sent to us with ``storescu``:

1. they reach Orthanc as received (same UIDs, same transfer syntax) and the queue says sent;
2. Orthanc stopped mid-queue, more images sent, Orthanc restarted: everything arrives, once;
3. our server killed with SIGKILL mid-delivery and restarted: nothing is lost, and nothing Orthanc
   had acknowledged before the kill is sent again (Orthanc counts every C-STORE it receives);
   then stopped with SIGTERM while the rest goes out: it stops cleanly, the next start sends the rest;
4. (second server) the AI SR and GSPS arrive in the image's study (the SR fetched back from
   Orthanc passes dciodvfy), then the specialist's GSPS and consult SR once a specialist has marked
   the image and answered through the web app's routes.

Small retry and poll times (``XRAY_TRIAGE_DELIVERY_*``) keep it quick; every wait is a bounded poll.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_validators import dciodvfy
from orthanc_helpers import ORTHANC_AET, Orthanc
from web_helpers import csrf_of

from e2e_helpers import (
    SHARED_DICOM,
    STATION1,
    check_cli,
    copy_with_new_uids,
    create_users,
    http,
    query,
    read_uids,
    store_ok,
    web_login,
)
from onnx_factory import write_tiny_model_dir

pytestmark = pytest.mark.slow

DEADLINE_S = 120.0
RATE_BYTES_PER_S = 1_500_000  # ~1.4 s per 2 MB image: the kill below lands mid-queue
DELIVERY_ENV = {
    "XRAY_TRIAGE_DELIVERY_RETRY_INITIAL_S": "0.5",
    "XRAY_TRIAGE_DELIVERY_RETRY_MAX_S": "2",
    "XRAY_TRIAGE_DELIVERY_POLL_S": "0.3",
    "XRAY_TRIAGE_DELIVERY_TIMEOUT_S": "10",
}
UNCOMPRESSED = SHARED_DICOM / "dev_01_dx_pa_explicit_window.dcm"
JPEG_LS = SHARED_DICOM / "dev_04_cr_pa_rescale_jpegls.dcm"


def wait_for(condition: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S, on_fail: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}\n{on_fail()}")


def destination_state(server: Any, name: str = "pacs") -> dict[str, Any]:
    body = http.get(server.url("/healthz"), timeout=10).json()
    return next(d for d in body["destinations"] if d["name"] == name)


def sent_uids(server: Any) -> set[str]:
    rows = query(server.data_dir, "SELECT sop_instance_uid FROM deliveries WHERE state = 'sent'")
    return {r["sop_instance_uid"] for r in rows}


def test_images_reach_orthanc_once_through_pacs_outage_and_server_kill(
    launch_server: Any, tmp_path: Path
) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        _run(launch_server, pacs, tmp_path)
    finally:
        pacs.stop()


def _run(launch_server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    server = launch_server.launch("delivery", env=DELIVERY_ENV, start=False)
    added = check_cli(
        "destinations", "add", "pacs", "--ae-title", ORTHANC_AET, "--host", "127.0.0.1",
        "--port", str(pacs.dicom_port), "--send", "images", "--rate-limit", str(RATE_BYTES_PER_S),
        "--data-dir", server.data_dir,
    )  # fmt: skip
    assert "added destination pacs" in added.stdout
    server.start()

    def tails() -> str:
        return f"{server.log_tail()}\n{pacs.log_tail()}\n{destination_state(server) if server.running else ''}"

    def arrived(uids: set[str]) -> Callable[[], bool]:
        return lambda: uids <= pacs.sop_uids()

    # 1. Images reach Orthanc as received: an uncompressed and a JPEG-LS one.
    first = copy_with_new_uids([UNCOMPRESSED, JPEG_LS], tmp_path / "first")
    for path in first:
        store_ok([path], server.dicom_port)
    first_uids = {read_uids(p).sop for p in first}
    wait_for(arrived(first_uids), "the first images in Orthanc", on_fail=tails)
    for path in first:
        uids = read_uids(path)
        [instance] = pacs.study_instances(uids.study)
        assert instance["MainDicomTags"]["SOPInstanceUID"] == uids.sop
        received = pydicom.dcmread(io.BytesIO(pacs.instance_file(uids.sop)))
        assert received.file_meta.TransferSyntaxUID == uids.transfer_syntax  # as stored, not re-encoded
    state = wait_for(lambda: (s := destination_state(server))["sent"] == 2 and s, "sent == 2", on_fail=tails)
    assert (state["queued"], state["failed"], state["state"]) == (0, 0, "ok"), state
    assert state["last_success_at"] is not None

    # 2. Orthanc goes down mid-queue; more images arrive meanwhile; Orthanc comes back.
    pacs.stop()
    outage = copy_with_new_uids([UNCOMPRESSED, UNCOMPRESSED], tmp_path / "outage")
    store_ok(outage, server.dicom_port)  # we keep acknowledging images while the PACS is down
    outage_uids = {read_uids(p).sop for p in outage}
    # Both images queued (the delivery consumer may enqueue the second after the first send failed).
    failing = wait_for(
        lambda: (s := destination_state(server))["state"] != "ok" and s["queued"] == 2 and s,
        "the destination to fail with both images queued",
        on_fail=tails,
    )
    assert failing["last_error"], failing
    pacs.start()
    wait_for(arrived(first_uids | outage_uids), "the outage's images in Orthanc", on_fail=tails)
    assert all(pacs.receipts()[uid] == 1 for uid in first_uids | outage_uids), pacs.receipts()
    wait_for(lambda: destination_state(server)["state"] == "ok", "the destination to recover", on_fail=tails)

    # 3. SIGKILL our server mid-delivery, restart it: nothing lost, nothing acknowledged sent twice.
    batch = copy_with_new_uids([UNCOMPRESSED] * 6, tmp_path / "kill")
    store_ok(batch, server.dicom_port)
    batch_uids = {read_uids(p).sop for p in batch}
    wait_for(lambda: sent_uids(server) & batch_uids, "one image of the batch sent", on_fail=tails)
    server.kill9()
    recorded_sent = sent_uids(server) & batch_uids
    acknowledged = {uid for uid, n in pacs.receipts().items() if n} & batch_uids
    assert recorded_sent <= acknowledged
    assert len(acknowledged - recorded_sent) <= 1  # at most the object in flight at the kill
    assert recorded_sent != batch_uids, "the kill came after the whole batch was sent: not mid-delivery"
    server.start()
    # 4. SIGTERM while the rest of the queue goes out (rate-limited): a clean, prompt stop; the next
    #    start sends what is left.
    wait_for(lambda: len(sent_uids(server) & batch_uids) > len(recorded_sent), "a send after the restart", on_fail=tails)
    server.stop_cleanly()
    server.start()
    everything = first_uids | outage_uids | batch_uids
    wait_for(arrived(everything), "every image in Orthanc after the restarts", on_fail=tails)
    wait_for(lambda: sent_uids(server) >= everything, "every row sent", on_fail=tails)
    receipts = pacs.receipts()
    assert all(receipts[uid] == 1 for uid in recorded_sent | first_uids | outage_uids), receipts
    resent = {uid for uid in batch_uids if receipts[uid] > 1}
    assert resent <= acknowledged - recorded_sent, (resent, acknowledged, recorded_sent)

    listed = json.loads(check_cli("destinations", "list", "--json", "--data-dir", server.data_dir).stdout)
    assert [(d["name"], d["sent"], d["queued"], d["state"]) for d in listed] == [("pacs", 10, 0, "ok")], listed


COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
GRAYSCALE_PS = "1.2.840.10008.5.1.4.1.1.11.1"
STATION_USER, SPECIALIST, PASSWORD = "st1", "bs.hoa", "a-long-e2e-password"


def result_rows(server: Any) -> list[Any]:
    return query(server.data_dir, "SELECT kind, sop_instance_uid FROM result_objects ORDER BY id")


def test_ai_and_specialist_results_reach_orthanc_in_the_study_of_their_image(
    launch_server: Any, tmp_path: Path
) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        _run_results(launch_server, pacs, tmp_path)
    finally:
        pacs.stop()


def _run_results(launch_server: Any, pacs: Orthanc, tmp_path: Path) -> None:
    model = tmp_path / "model"  # every threshold 0: every label flagged, so the objects have findings
    write_tiny_model_dir(model, thresholds={"Abnormal": 0.0, "Effusion": 0.0, "Pneumothorax": 0.0})
    server = launch_server.launch("delivery-results", model=model, env=DELIVERY_ENV, start=False)
    check_cli(
        "destinations", "add", "pacs", "--ae-title", ORTHANC_AET, "--host", "127.0.0.1",
        "--port", str(pacs.dicom_port), "--send", "images,ai-results,consult-results", "--data-dir", server.data_dir,
    )  # fmt: skip
    create_users(
        server.data_dir, [(STATION_USER, "station", STATION1, PASSWORD), (SPECIALIST, "specialist", None, PASSWORD)]
    )
    server.start()

    def tails() -> str:
        return f"{server.log_tail()}\n{pacs.log_tail()}\nOrthanc has: {pacs.sop_uids()}"

    def in_orthanc(uid: str) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.study_instances(uid)}

    (image,) = copy_with_new_uids([UNCOMPRESSED], tmp_path / "send")
    uids = read_uids(image)
    store_ok([image], server.dicom_port)

    # The image, its AI SR and its AI GSPS arrive in the same study in Orthanc.
    ai = wait_for(lambda: len(rows := result_rows(server)) >= 2 and rows, "the AI objects", on_fail=tails)
    ai_uids = {r["kind"]: r["sop_instance_uid"] for r in ai}
    assert set(ai_uids) == {"ai-sr", "ai-gsps"}
    wait_for(lambda: in_orthanc(uids.study) >= {uids.sop, *ai_uids.values()}, "the AI objects in Orthanc", on_fail=tails)
    sr_path = tmp_path / "ai-sr-from-orthanc.dcm"
    sr_path.write_bytes(pacs.instance_file(ai_uids["ai-sr"]))
    assert dciodvfy(sr_path) == []
    sr = pydicom.dcmread(sr_path)
    assert (sr.SOPClassUID, sr.StudyInstanceUID) == (COMPREHENSIVE_SR, uids.study)
    gsps = pydicom.dcmread(io.BytesIO(pacs.instance_file(ai_uids["ai-gsps"])))
    assert (gsps.SOPClassUID, gsps.StudyInstanceUID) == (GRAYSCALE_PS, uids.study)

    # A station doctor asks, a specialist marks the image and answers, all through the web app.
    station = web_login(server.url(""), STATION_USER, PASSWORD)
    specialist = web_login(server.url(""), SPECIALIST, PASSWORD)
    for client in (station, specialist):
        client.headers["X-CSRF-Token"] = csrf_of(client)  # type: ignore[arg-type]
    asked = station.post(f"/studies/{uids.study}/consults", data={"question": "Tràn dịch?", "urgency": "urgent"})
    assert asked.status_code == 303, asked.text[:500]
    [consult] = query(server.data_dir, "SELECT id FROM consults")
    mark = specialist.post(
        f"/api/studies/{uids.study}/annotations",
        json={"instance_uid": uids.sop, "kind": "rect", "geometry": {"x": 100, "y": 120, "w": 200, "h": 150}, "label": "dịch"},
    )
    assert mark.status_code == 201, mark.text[:500]
    for path, form in (
        (f"/consults/{consult['id']}/claim", {}),
        (f"/consults/{consult['id']}/messages", {"body": "Tràn dịch màng phổi phải, chuyển viện."}),
        (f"/consults/{consult['id']}/conclusion", {"conclusion": "refer_hospital"}),
    ):
        response = specialist.post(path, data=form)
        assert response.status_code == 303, (path, response.status_code, response.text[:500])

    # Every event up to the conclusion is worked off by the results consumer: its objects are final.
    # (Up to the conclusion's own event: the consumer skips the events after it that are none of its
    # business, e.g. the ResultObjectStored it raised itself, without writing its cursor each time.)
    last_event = query(server.data_dir, "SELECT MAX(id) AS id FROM outbox_events WHERE type = 'consult.answered'")[0]["id"]
    wait_for(
        lambda: query(server.data_dir, "SELECT last_id FROM outbox_cursors WHERE consumer = 'results'")[0]["last_id"]
        >= last_event,
        "the results consumer to make the specialist's objects",
        on_fail=tails,
    )
    newest = {r["kind"]: r["sop_instance_uid"] for r in result_rows(server)}  # the newest version of each kind
    assert {"annotation-gsps", "consult-sr"} <= set(newest), newest
    every_object = {r["sop_instance_uid"] for r in result_rows(server)}
    wait_for(lambda: in_orthanc(uids.study) >= every_object | {uids.sop}, "every object in Orthanc", on_fail=tails)
    marks = pydicom.dcmread(io.BytesIO(pacs.instance_file(newest["annotation-gsps"])))
    assert marks.SOPClassUID == GRAYSCALE_PS and marks.StudyInstanceUID == uids.study
    report_path = tmp_path / "consult-sr-from-orthanc.dcm"
    report_path.write_bytes(pacs.instance_file(newest["consult-sr"]))
    assert dciodvfy(report_path) == []
    report = pydicom.dcmread(report_path)
    assert (report.SOPClassUID, report.StudyInstanceUID) == (ENHANCED_SR, uids.study)
    assert all(n == 1 for n in pacs.receipts().values()), pacs.receipts()
