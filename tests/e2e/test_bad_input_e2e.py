"""End to end: what a broken or hostile sender cannot do to the server.

After every case the server must still answer C-ECHO, leave no ``.part`` file in
``incoming/``, and keep files and rows in one-to-one correspondence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from e2e_helpers import (
    SampleFile,
    Server,
    assert_store_consistent,
    copy_with_new_uids,
    dataset_bytes,
    dcmodify,
    first_fragment_offset,
    is_failure_status,
    own_error_lines,
    query,
    read_uids,
    scalar,
    send_raw_c_store,
    store_ok,
    storescu,
    write_random_dataset_file,
)

pytestmark = pytest.mark.slow

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def server(module_launcher: Any) -> Server:
    return module_launcher.launch("bad-input")


@pytest.fixture
def sample(samples: list[SampleFile]) -> Any:
    def pick(prefix: str) -> SampleFile:
        found = [s for s in samples if s.name.startswith(prefix)]
        if not found:
            pytest.skip(f"{prefix}* is not in the shared data")
        return found[0]

    return pick


def instance_count(server: Server) -> int:
    return int(scalar(server.data_dir, "SELECT COUNT(*) FROM instances"))


def stored_sops(server: Server) -> set[str]:
    return {r[0] for r in query(server.data_dir, "SELECT sop_instance_uid FROM instances")}


def dicom_files(server: Server) -> set[Path]:
    return set((server.data_dir / "dicom").rglob("*")) if (server.data_dir / "dicom").exists() else set()


def assert_healthy(server: Server) -> None:
    server.echo_ok()
    assert server.api("/healthz")["status"] == "ok"
    assert_store_consistent(server.data_dir)


def assert_nothing_stored(server: Server, before_count: int, before_files: set[Path], sop_uid: str) -> None:
    assert sop_uid not in stored_sops(server)
    assert instance_count(server) == before_count
    assert dicom_files(server) == before_files


def test_truncated_pixel_data(server: Server, sample: Any, tmp_path: Path) -> None:
    source = sample("dev_01")  # Explicit VR Little Endian, native pixel data
    (full,) = copy_with_new_uids([source.path], tmp_path)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1_000_000])  # cut in the middle of the 2 MiB Pixel Data
    sop = read_uids(full).sop
    before_count, before_files = instance_count(server), dicom_files(server)

    # storescu reads the file before sending and refuses it client-side.
    run = storescu([truncated], server.dicom_port, ts_flag="-xe")
    assert run.returncode != 0, run.describe()
    assert "Success" not in run.store_responses, run.describe()

    # A raw sender streams the bytes as they are: the server must refuse them.
    status = send_raw_c_store(truncated, server.dicom_port)
    assert status & 0xFF00 == 0xA900, f"status 0x{status:04X}, expected 0xA9xx\n{server.log_tail()}"
    assert_nothing_stored(server, before_count, before_files, sop)
    assert_healthy(server)


def test_random_bytes(server: Server, tmp_path: Path) -> None:
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(os.urandom(300_000))
    before_count, before_files = instance_count(server), dicom_files(server)

    run = storescu([noise], server.dicom_port, ts_flag="-xe")
    assert run.returncode != 0, run.describe()
    assert "Success" not in run.store_responses, run.describe()

    # Random bytes behind a valid File Meta header, streamed unchanged by a raw sender.
    garbage = tmp_path / "garbage.dcm"
    sop = write_random_dataset_file(garbage)
    status = send_raw_c_store(garbage, server.dicom_port)
    assert is_failure_status(status), f"status 0x{status:04X}\n{server.log_tail()}"
    assert_nothing_stored(server, before_count, before_files, sop)
    assert_healthy(server)


def test_image_without_pixel_data(server: Server, sample: Any, tmp_path: Path) -> None:
    (no_pixels,) = copy_with_new_uids([sample("dev_01").path], tmp_path)
    dcmodify("-e", "(7fe0,0010)", no_pixels)
    sop = read_uids(no_pixels).sop
    before_count, before_files = instance_count(server), dicom_files(server)

    run = storescu([no_pixels], server.dicom_port)
    assert run.returncode != 0, run.describe()
    assert len(run.store_responses) == 1 and run.store_responses[0] != "Success", run.describe()

    status = send_raw_c_store(no_pixels, server.dicom_port)
    assert status == 0xA900, f"status 0x{status:04X}\n{server.log_tail()}"
    assert_nothing_stored(server, before_count, before_files, sop)
    assert_healthy(server)


def test_ct_image_is_stored_but_not_triaged(server: Server, sample: Any, tmp_path: Path) -> None:
    import pydicom

    (ct,) = copy_with_new_uids([sample("dev_01").path], tmp_path)
    # dcmodify refuses to touch group 0002 itself, but (without -nmu) it rewrites the
    # meta header's Media Storage SOP Class UID from the changed SOP Class UID.
    dcmodify("-m", f"(0008,0016)={CT_IMAGE_STORAGE}", "-m", "(0008,0060)=CT", ct)
    uids = read_uids(ct)
    assert uids.sop_class == CT_IMAGE_STORAGE
    assert (
        str(pydicom.dcmread(ct, stop_before_pixels=True).file_meta.MediaStorageSOPClassUID)
        == CT_IMAGE_STORAGE
    )

    store_ok([ct], server.dicom_port)
    study = server.wait_final([uids.study])[uids.study]
    assert study["ai_status"] == "not_applicable", study
    assert study["priority"] is None, study
    (image,) = study["images"]
    assert image["ai_status"] == "not_applicable" and image["result"] is None, image
    assert image["modality"] == "CT" and image["sop_class_uid"] == CT_IMAGE_STORAGE, image
    jobs = scalar(
        server.data_dir,
        "SELECT COUNT(*) FROM triage_jobs j JOIN instances i ON i.id = j.instance_id WHERE i.sop_instance_uid = ?",
        [uids.sop],
    )
    assert jobs == 0
    assert (server.data_dir / image["file_path"]).is_file()
    assert_healthy(server)


def test_undecodable_image_fails_triage_with_a_reason(server: Server, sample: Any, tmp_path: Path) -> None:
    (jls,) = copy_with_new_uids([sample("dev_04").path], tmp_path)  # JPEG-LS lossless
    data = bytearray(jls.read_bytes())
    start, length = first_fragment_offset(bytes(data))
    assert data[start : start + 2] == b"\xff\xd8", "fragment does not start with a JPEG SOI marker"
    data[start : start + 64] = b"\x00" * 64  # codestream broken; item tags and lengths intact
    jls.write_bytes(bytes(data))
    uids = read_uids(jls)

    store_ok([jls], server.dicom_port)  # passes the gateway: the structure is fine
    study = server.wait_final([uids.study])[uids.study]
    assert study["ai_status"] == "failed", study
    (image,) = study["images"]
    assert image["ai_status"] == "failed", image
    assert image["result"] is None, image
    assert image["ai_error"] and "decode" in image["ai_error"], image
    row = query(
        server.data_dir,
        "SELECT j.state, j.error FROM triage_jobs j JOIN instances i ON i.id = j.instance_id "
        "WHERE i.sop_instance_uid = ?",
        [uids.sop],
    )
    assert [r["state"] for r in row] == ["failed"] and row[0]["error"], [dict(r) for r in row]
    assert dataset_bytes(server.data_dir / image["file_path"]) == dataset_bytes(jls)  # stored as received
    assert_healthy(server)


def _snapshot(root: Path, skip: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if skip not in p.parents and p != skip and p.suffix != ".log"
    }


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("field", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_hostile_uid_is_refused(server: Server, sample: Any, tmp_path: Path, field: str) -> None:
    import pydicom

    ds = pydicom.dcmread(sample("dev_01").path)
    hostile = "1.2.3/../../../../../../escaped_" + field
    assert len(hostile) <= 64
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    setattr(ds, field, hostile)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    crafted = tmp_path / "hostile.dcm"
    ds.save_as(crafted)

    outer = server.root.parent  # the data directory's grandparent: where ../.. would land
    before_outside = _snapshot(outer, server.data_dir)
    before_count, before_files = instance_count(server), dicom_files(server)

    status = send_raw_c_store(crafted, server.dicom_port)
    assert status == 0xA900, f"status 0x{status:04X}\n{server.log_tail()}"
    assert instance_count(server) == before_count
    assert dicom_files(server) == before_files
    assert _snapshot(outer, server.data_dir) == before_outside
    assert not [p for p in outer.rglob("*escaped*")], "a file was written from the hostile UID"
    assert_healthy(server)


def test_server_survived_everything(server: Server) -> None:
    assert server.running
    assert_healthy(server)
    # The server's own loggers report no error: every bad input was an expected refusal.
    # (pydicom's decoder logs its own ERROR with a traceback for the corrupt JPEG-LS; not ours.)
    own_errors = own_error_lines(server.log())
    assert not own_errors, own_errors
    assert "unexpected error storing instance" not in server.log()
