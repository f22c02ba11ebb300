"""Query/retrieve on the gateway's port, end to end with dcmtk findscu, movescu, getscu.

One server, two stations with one study each (sent with storescu), a PACS-like AE that
may see every station, and a C-MOVE destination: a dcmtk ``storescp`` started here.
A station's AE title finds, gets and moves only its own station's studies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from e2e_helpers import (
    STATION1,
    DcmtkRun,
    SampleFile,
    Server,
    check_cli,
    copy_with_new_uids,
    dataset_bytes,
    dcmodify,
    dcmtk_env,
    free_port,
    port_open,
    read_uids,
    store_ok,
)

pytestmark = pytest.mark.slow

STATION2 = "STATION2"
PACS = "PACS_QR"
UNKNOWN = "STRANGER"
DEST = "MOVE_DEST"
CALLED = "XRAY_TRIAGE"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_LS = "1.2.840.10008.1.2.4.80"


def _dcmtk(args: list[str], cwd: Path | None = None) -> DcmtkRun:
    proc = subprocess.run(
        args, capture_output=True, text=True, errors="replace", env=dcmtk_env(), timeout=120, cwd=cwd
    )
    return DcmtkRun(args, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A dcmtk storescp (uncompressed transfer syntaxes only, its default), bit-preserving."""
    missing = [tool for tool in ("storescp", "findscu", "movescu", "getscu") if shutil.which(tool) is None]
    if missing:
        message = f"dcmtk tools not installed: {', '.join(missing)} (apt-get install dcmtk)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("move-dest")
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", DEST, "+B", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    deadline = time.monotonic() + 30
    while not port_open(port):
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.1)
    yield port, out
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def site(module_launcher: Any, storescp: tuple[int, Path], samples: list[SampleFile], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    port, _ = storescp
    server = module_launcher.launch(
        "qr",
        stations=[(STATION2, "Station two", None), (PACS, "Hospital PACS", None)],
        env={
            "XRAY_TRIAGE_QR_ALL_STATIONS_AE_TITLES": json.dumps([PACS]),
            "XRAY_TRIAGE_ACCEPT_UNKNOWN_STATIONS": "true",
            "XRAY_TRIAGE_TRIAGE_WORKERS": "0",
        },
    )
    work = tmp_path_factory.mktemp("qr-files")
    by_ts = {s.transfer_syntax: s for s in samples}
    (one,) = copy_with_new_uids([by_ts[EXPLICIT].path], work / "one")
    (two,) = copy_with_new_uids([by_ts[JPEG_LS].path], work / "two")
    dcmodify("-i", "PatientID=QR-ONE", "-i", "PatientName=Nguyen^Van An", "-i", "StudyDate=20240105", one)
    dcmodify("-i", "PatientID=QR-TWO", "-i", "PatientName=Tran^Thi Binh", "-i", "StudyDate=20240320", two)
    # The C-MOVE destination: the delivery registry's, added while the server runs (looked up at
    # each C-MOVE). It gets consult results only, so no image is delivered to it automatically.
    check_cli(
        "destinations", "add", "storescp", "--ae-title", DEST, "--host", "127.0.0.1", "--port", str(port),
        "--send", "none", "--data-dir", server.data_dir,
    )
    store_ok([one], server.dicom_port, aet=STATION1, ts_flag="-xe")
    store_ok([two], server.dicom_port, aet=STATION2, ts_flag="-xt")
    return {"server": server, "one": one, "two": two, "u1": read_uids(one), "u2": read_uids(two)}


def findscu(server: Server, aet: str, level: str, keys: dict[str, str], out: Path) -> tuple[DcmtkRun, list[pydicom.Dataset]]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-v", "-S", "-X", "-od", str(out), "-aet", aet, "-aec", CALLED, "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    run = _dcmtk([*args, "127.0.0.1", str(server.dicom_port)])
    return run, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_find_study_level_sees_only_own_station(site: dict[str, Any], tmp_path: Path) -> None:
    server = site["server"]
    keys = {"PatientID": "", "PatientName": "", "StudyInstanceUID": "", "StudyDate": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}
    run, found = findscu(server, STATION1, "STUDY", keys, tmp_path / "s1")
    assert run.returncode == 0, run.describe()
    assert [str(d.StudyInstanceUID) for d in found] == [site["u1"].study], run.describe()
    assert found[0].PatientID == "QR-ONE" and str(found[0].PatientName) == "Nguyen^Van An"
    assert found[0].NumberOfStudyRelatedInstances == 1 and found[0].ModalitiesInStudy == "DX"

    run, found = findscu(server, STATION2, "STUDY", keys, tmp_path / "s2")
    assert [str(d.StudyInstanceUID) for d in found] == [site["u2"].study], run.describe()

    # Guessing the other station's UID finds nothing.
    run, found = findscu(server, STATION1, "STUDY", {"StudyInstanceUID": site["u2"].study}, tmp_path / "guess")
    assert run.returncode == 0 and found == [], run.describe()

    # The PACS listed in qr_all_stations_ae_titles sees both; wildcard and date range match.
    run, found = findscu(server, PACS, "STUDY", keys, tmp_path / "pacs")
    assert {str(d.StudyInstanceUID) for d in found} == {site["u1"].study, site["u2"].study}, run.describe()
    run, found = findscu(server, PACS, "STUDY", {"PatientName": "Tran*", "StudyInstanceUID": ""}, tmp_path / "wild")
    assert [str(d.StudyInstanceUID) for d in found] == [site["u2"].study], run.describe()
    run, found = findscu(server, PACS, "STUDY", {"StudyDate": "20240101-20240131", "StudyInstanceUID": ""}, tmp_path / "range")
    assert [str(d.StudyInstanceUID) for d in found] == [site["u1"].study], run.describe()


def test_find_series_and_image_levels(site: dict[str, Any], tmp_path: Path) -> None:
    server = site["server"]
    u2 = site["u2"]
    run, found = findscu(server, STATION2, "SERIES", {"StudyInstanceUID": u2.study, "SeriesInstanceUID": "", "Modality": ""}, tmp_path / "series")
    modality = pydicom.dcmread(site["two"], stop_before_pixels=True).Modality
    assert [(str(d.SeriesInstanceUID), d.Modality) for d in found] == [(u2.series, modality)], run.describe()
    run, found = findscu(server, STATION2, "IMAGE", {"StudyInstanceUID": u2.study, "SeriesInstanceUID": u2.series, "SOPInstanceUID": "", "SOPClassUID": ""}, tmp_path / "image")
    assert [(str(d.SOPInstanceUID), str(d.SOPClassUID)) for d in found] == [(u2.sop, u2.sop_class)], run.describe()
    # Station 1 asking for station 2's series by UID: nothing.
    run, found = findscu(server, STATION1, "IMAGE", {"SeriesInstanceUID": u2.series, "SOPInstanceUID": ""}, tmp_path / "other")
    assert run.returncode == 0 and found == [], run.describe()


def test_unregistered_calling_ae_is_refused(site: dict[str, Any], tmp_path: Path) -> None:
    """accept_unknown_stations lets it store, never query: status 0x0124 Refused: Not Authorised."""
    run, found = findscu(site["server"], UNKNOWN, "STUDY", {"StudyInstanceUID": ""}, tmp_path / "u")
    assert found == [], run.describe()
    assert re.search(r"Final Find Response \(.*0x0?124\)", run.output), run.describe()
    # C-GET and C-MOVE too: nothing is sent.
    study = f"StudyInstanceUID={site['u1'].study}"
    out = tmp_path / "get"
    out.mkdir()
    port = str(site["server"].dicom_port)
    run = _dcmtk(["getscu", "-v", "-S", "-od", str(out), "-aet", UNKNOWN, "-aec", CALLED, "-k", "QueryRetrieveLevel=STUDY", "-k", study, "127.0.0.1", port])
    assert not list(out.iterdir()) and re.search(r"0x0?124", run.output), run.describe()
    run = _dcmtk(["movescu", "-v", "-S", "-aet", UNKNOWN, "-aec", CALLED, "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY", "-k", study, "127.0.0.1", port])
    assert re.search(r"0x0?124", run.output), run.describe()


def test_move_sends_own_study_byte_for_byte(site: dict[str, Any], storescp: tuple[int, Path], tmp_path: Path) -> None:
    server = site["server"]
    _, received = storescp
    u1, u2 = site["u1"], site["u2"]

    def movescu(aet: str, dest: str, study: str) -> DcmtkRun:
        return _dcmtk(["movescu", "-v", "-S", "-aet", aet, "-aec", CALLED, "-aem", dest, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.dicom_port)])

    run = movescu(STATION1, DEST, u1.study)
    assert run.returncode == 0 and "Success" in run.output, run.describe() + server.log_tail()
    files = list(received.glob(f"*{u1.sop}*"))
    assert len(files) == 1, (list(received.iterdir()), run.describe())
    assert dataset_bytes(files[0]) == dataset_bytes(site["one"])  # as received, not re-encoded

    # Another station's study: zero sub-operations, nothing arrives.
    run = movescu(STATION1, DEST, u2.study)
    assert run.returncode == 0, run.describe()
    assert not list(received.glob(f"*{u2.sop}*"))

    # Station 2 moves its JPEG-LS image to a destination that takes uncompressed syntaxes only:
    # decoded for it, same SOP Instance UID, same pixels.
    run = movescu(STATION2, DEST, u2.study)
    files = list(received.glob(f"*{u2.sop}*"))
    assert run.returncode == 0 and len(files) == 1, run.describe() + server.log_tail()
    got = pydicom.dcmread(files[0])
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, pydicom.dcmread(site["two"]).pixel_array)

    # An unknown destination: 0xA801.
    run = movescu(STATION1, "NOWHERE", u1.study)
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in run.output, run.describe()


def test_get_own_study_decompressed_for_an_uncompressed_peer(site: dict[str, Any], tmp_path: Path) -> None:
    server = site["server"]
    u1, u2 = site["u1"], site["u2"]

    def getscu(aet: str, study: str, out: Path) -> DcmtkRun:
        out.mkdir()
        return _dcmtk(["getscu", "-v", "-S", "+B", "-od", str(out), "-aet", aet, "-aec", CALLED, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(server.dicom_port)])

    # The JPEG-LS image to a getscu that proposes uncompressed syntaxes only: decoded for it.
    run = getscu(STATION2, u2.study, tmp_path / "two")
    files = list((tmp_path / "two").iterdir())
    assert run.returncode == 0 and len(files) == 1, run.describe() + server.log_tail()
    got = pydicom.dcmread(files[0])
    assert str(got.SOPInstanceUID) == u2.sop and not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, pydicom.dcmread(site["two"]).pixel_array)

    # Station 1 cannot get station 2's study.
    run = getscu(STATION1, u2.study, tmp_path / "none")
    assert run.returncode == 0 and not list((tmp_path / "none").iterdir()), run.describe()

    # Its own, uncompressed: the same elements (getscu proposes one context per SOP class and
    # the gateway accepts Implicit VR there, so pynetdicom re-encodes it in that syntax).
    run = getscu(STATION1, u1.study, tmp_path / "one")
    files = list((tmp_path / "one").iterdir())
    assert len(files) == 1, run.describe()
    assert pydicom.dcmread(files[0]) == pydicom.dcmread(site["one"])
