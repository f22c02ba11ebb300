"""End to end: nothing acknowledged is lost or misfiled (incomplete data sets, UID conflicts).

A real server with two registered stations; a station-1 user, an admin and the
data directory are checked after each send: what the modality was told, what is
on disk and in the database, what ``/admin`` shows, and what station 1 can see.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from e2e_helpers import (
    STATION1,
    SampleFile,
    Server,
    assert_store_consistent,
    copy_with_new_uids,
    counts_for_sop,
    create_users,
    dataset_bytes,
    dcmodify,
    http,
    query,
    read_uids,
    scalar,
    send_raw_c_store,
    store_ok,
    web_login,
)

pytestmark = pytest.mark.slow

STATION2 = "STATION2"
ADMIN_PASSWORD = "e2e-admin-password"
STATION_PASSWORD = "e2e-station-password"
PIXEL_DATA_OW = b"\xe0\x7f\x10\x00OW\x00\x00"


@pytest.fixture(scope="module")
def server(module_launcher: Any) -> Server:
    server = module_launcher.launch("integrity", stations=[(STATION2, "Trạm Y tế Cần Giờ", None)], start=False)
    server.tokens = create_users(  # type: ignore[attr-defined]
        server.data_dir,
        [
            ("e2e-admin", "admin", None, ADMIN_PASSWORD),
            ("e2e-station1", "station", STATION1, STATION_PASSWORD),
        ],
    )
    return server.start()


@pytest.fixture
def dev01(samples: list[SampleFile]) -> Path:
    found = [s.path for s in samples if s.name.startswith("dev_01")]
    if not found:
        pytest.skip("dev_01 is not in the shared data")
    return found[0]


def station1_get(server: Server, path: str) -> httpx.Response:
    token = server.tokens["e2e-station1"]  # type: ignore[attr-defined]
    return http.get(server.url(path), headers={"Authorization": f"Bearer {token}"})


def station1_sops(server: Server) -> set[str]:
    """Every SOP Instance UID a station-1 user can reach through the JSON API."""
    response = station1_get(server, "/api/studies?limit=500")
    assert response.status_code == 200, response.text
    sops: set[str] = set()
    for study in response.json()["studies"]:
        detail = station1_get(server, f"/api/studies/{study['study_uid']}")
        assert detail.status_code == 200, detail.text
        sops |= {image["sop_instance_uid"] for image in detail.json()["images"]}
    return sops


def admin_page(server: Server) -> str:
    client = web_login(server.url(""), "e2e-admin", ADMIN_PASSWORD)
    try:
        response = client.get("/admin")
    finally:
        client.close()
    assert response.status_code == 200, response.text[:500]
    return response.text


def quarantine_rows(server: Server, sop_uid: str) -> list[Any]:
    return query(
        server.data_dir,
        "SELECT reason, calling_ae, conflicting_station_ae, file_path, study_instance_uid, series_instance_uid "
        "FROM quarantined_instances WHERE sop_instance_uid = ? ORDER BY id",
        [sop_uid],
    )


def instance_count(server: Server) -> int:
    return int(scalar(server.data_dir, "SELECT COUNT(*) FROM instances"))


def dicom_files(server: Server) -> set[Path]:
    return set((server.data_dir / "dicom").rglob("*.dcm"))


# -- item 4: an element longer than the bytes received ------------------------------------


def _refused_and_nothing_stored(server: Server, crafted: Path) -> None:
    sop = read_uids(crafted).sop
    before_count, before_files = instance_count(server), dicom_files(server)
    status = send_raw_c_store(crafted, server.dicom_port)
    assert status == 0xA900, f"status 0x{status:04X}, expected 0xA900\n{server.log_tail()}"
    assert counts_for_sop(server.data_dir, sop) == (0, 0, 0)
    assert instance_count(server) == before_count
    assert dicom_files(server) == before_files
    assert not list((server.data_dir / "quarantine").rglob(f"*{sop}*"))
    assert_store_consistent(server.data_dir)


def test_pixel_data_declaring_more_than_was_sent_is_refused(server: Server, dev01: Path, tmp_path: Path) -> None:
    (image,) = copy_with_new_uids([dev01], tmp_path)
    data = bytearray(image.read_bytes())
    pos = bytes(data).rfind(PIXEL_DATA_OW)
    assert pos > 0
    (length,) = struct.unpack_from("<I", data, pos + 8)
    assert length == 1024 * 1024 * 2 and pos + 12 + length == len(data)  # Rows x Columns x 2 bytes, all sent
    struct.pack_into("<I", data, pos + 8, 100 * 1024 * 1024)  # declares 100 MiB; geometry still matches 2 MiB
    image.write_bytes(bytes(data))
    _refused_and_nothing_stored(server, image)


def test_any_element_declaring_more_than_was_sent_is_refused(server: Server, dev01: Path, tmp_path: Path) -> None:
    (image,) = copy_with_new_uids([dev01], tmp_path)
    # Data Set Trailing Padding (FFFC,FFFC) OB after complete Pixel Data: declares 4096 bytes, 16 sent.
    trailing = b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<I", 4096) + b"\x00" * 16
    image.write_bytes(image.read_bytes() + trailing)
    _refused_and_nothing_stored(server, image)


# -- item 6: same SOP Instance UID, different content -------------------------------------


def test_same_sop_uid_with_other_content_is_quarantined_and_identical_resends_are_idempotent(
    server: Server, dev01: Path, tmp_path: Path
) -> None:
    (first,) = copy_with_new_uids([dev01], tmp_path / "first")
    second = tmp_path / "second.dcm"
    second.write_bytes(first.read_bytes())
    dcmodify("-m", "(0010,0010)=Other^Patient", second)  # same UIDs, other content
    uids = read_uids(first)
    assert read_uids(second) == uids and dataset_bytes(second) != dataset_bytes(first)

    store_ok([first], server.dicom_port)
    study = server.wait_final([uids.study])[uids.study]
    (image,) = study["images"]
    store_ok([second], server.dicom_port)  # acknowledged: so it must be kept

    assert counts_for_sop(server.data_dir, uids.sop) == (1, 1, 1)  # the first copy, triaged once
    kept_copies = [p for p in server.data_dir.rglob("*.dcm") if dataset_bytes(p) == dataset_bytes(second)]
    assert len(kept_copies) == 1, "the acknowledged second data set is not on disk"
    assert dataset_bytes(server.data_dir / image["file_path"]) == dataset_bytes(first)  # not overwritten
    (row,) = quarantine_rows(server, uids.sop)
    assert row["reason"] == "sop_instance_conflict" and row["calling_ae"] == STATION1, dict(row)
    kept = server.data_dir / row["file_path"]
    assert row["file_path"].startswith("quarantine/") and dataset_bytes(kept) == dataset_bytes(second)
    after = server.study(uids.study)
    assert [i["sop_instance_uid"] for i in after["images"]] == [uids.sop]
    assert after["patient_name_dicom"] == study["patient_name_dicom"] != "Other^Patient"
    assert "C-STORE quarantined" in server.log() and "WARNING" in next(
        line for line in server.log().splitlines() if "C-STORE quarantined" in line and uids.sop in line
    )
    page = admin_page(server)
    assert uids.sop in page.split('id="quarantine"')[1].split("</section>")[0]

    # Identical re-sends of either copy: Success, nothing new.
    store_ok([first], server.dicom_port)
    store_ok([second], server.dicom_port)
    assert counts_for_sop(server.data_dir, uids.sop) == (1, 1, 1)
    assert len(quarantine_rows(server, uids.sop)) == 1
    assert_store_consistent(server.data_dir)


# -- item 7: a Study / Series Instance UID reused by another station -----------------------


def test_study_uid_of_another_station_is_quarantined_not_shown_to_that_station(
    server: Server, dev01: Path, tmp_path: Path
) -> None:
    own, other = copy_with_new_uids([dev01, dev01], tmp_path)
    own_uids = read_uids(own)
    dcmodify("-m", f"(0020,000D)={own_uids.study}", other)  # station 2 reuses station 1's Study UID
    other_uids = read_uids(other)
    assert other_uids.study == own_uids.study and other_uids.sop != own_uids.sop

    store_ok([own], server.dicom_port)
    server.wait_final([own_uids.study])
    store_ok([other], server.dicom_port, aet=STATION2)

    assert counts_for_sop(server.data_dir, other_uids.sop) == (0, 0, 0)  # in no study, not triaged
    (row,) = quarantine_rows(server, other_uids.sop)
    assert row["reason"] == "study_of_other_station", dict(row)
    assert (row["calling_ae"], row["conflicting_station_ae"]) == (STATION2, STATION1)
    assert dataset_bytes(server.data_dir / row["file_path"]) == dataset_bytes(other)
    study = station1_get(server, f"/api/studies/{own_uids.study}").json()
    assert [i["sop_instance_uid"] for i in study["images"]] == [own_uids.sop]
    sops = station1_sops(server)
    assert own_uids.sop in sops and other_uids.sop not in sops
    assert station1_get(server, f"/api/studies/{own_uids.study}/images/{other_uids.sop}/windows").status_code == 404
    browser = web_login(server.url(""), "e2e-station1", STATION_PASSWORD)
    try:
        page = browser.get(f"/studies/{own_uids.study}")
        render = browser.get(f"/studies/{own_uids.study}/images/{other_uids.sop}/render")
    finally:
        browser.close()
    assert page.status_code == 200 and own_uids.sop in page.text and other_uids.sop not in page.text
    assert render.status_code == 404
    page = admin_page(server)
    quarantine = page.split('id="quarantine"')[1].split("</section>")[0]
    assert other_uids.sop in quarantine and STATION2 in quarantine
    assert any("C-STORE quarantined" in line and "WARNING" in line and other_uids.sop in line
               for line in server.log().splitlines())  # fmt: skip
    assert_store_consistent(server.data_dir)


def test_series_uid_of_another_station_is_quarantined(server: Server, dev01: Path, tmp_path: Path) -> None:
    own, other = copy_with_new_uids([dev01, dev01], tmp_path)
    own_uids = read_uids(own)
    dcmodify("-m", f"(0020,000E)={own_uids.series}", other)  # new study, station 1's Series UID
    other_uids = read_uids(other)

    store_ok([own], server.dicom_port)
    server.wait_final([own_uids.study])
    store_ok([other], server.dicom_port, aet=STATION2)

    assert counts_for_sop(server.data_dir, other_uids.sop) == (0, 0, 0)
    (row,) = quarantine_rows(server, other_uids.sop)
    assert row["reason"] == "series_of_other_station" and row["conflicting_station_ae"] == STATION1, dict(row)
    assert server.api(f"/api/studies/{other_uids.study}", expect=404)  # no study was made for it
    study = station1_get(server, f"/api/studies/{own_uids.study}").json()
    assert [i["sop_instance_uid"] for i in study["images"]] == [own_uids.sop]
    assert other_uids.sop not in station1_sops(server)
    assert_store_consistent(server.data_dir)


def test_series_uid_reused_in_another_study_of_the_same_station_is_not_misfiled(
    server: Server, dev01: Path, tmp_path: Path
) -> None:
    first, second = copy_with_new_uids([dev01, dev01], tmp_path)
    first_uids = read_uids(first)
    dcmodify("-m", f"(0020,000E)={first_uids.series}", second)  # its own new study, the first's series
    second_uids = read_uids(second)
    store_ok([first, second], server.dicom_port)

    assert counts_for_sop(server.data_dir, second_uids.sop)[0] == 0
    (row,) = quarantine_rows(server, second_uids.sop)
    assert row["reason"] == "series_of_other_study", dict(row)
    study = server.wait_final([first_uids.study])[first_uids.study]
    assert [i["sop_instance_uid"] for i in study["images"]] == [first_uids.sop]
    assert_store_consistent(server.data_dir)


def test_server_logged_no_errors(server: Server) -> None:
    from e2e_helpers import own_error_lines

    server.echo_ok()
    assert not own_error_lines(server.log()), own_error_lines(server.log())
