"""Receiving C-STORE data sets to disk (issue 17): the file pynetdicom writes into, and its checks.

A real kernel ENOSPC comes from ``/dev/full``; the completeness check must say the same of a
file as of the same bytes in memory.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dicom_gateway import receive_to_disk
from e2e_helpers import SHARED_DATA
from xray_triage.store.completeness import incompleteness

SHARED_DICOM = SHARED_DATA / "dicom"
REALWORLD = SHARED_DATA / "dicom-realworld"


def test_a_write_error_is_kept_not_raised_and_the_space_given_back(tmp_path: Path) -> None:
    received = receive_to_disk.ReceivedFile(tmp_path)
    received.write(b"\0" * 128 + b"DICM")
    received.flush()
    assert Path(received.name).stat().st_size == 132
    received._fp.close()
    received._fp = open("/dev/full", "wb")  # noqa: SIM115 - every write to it fails with ENOSPC
    received.write(b"x" * 65536)  # pynetdicom goes on writing the rest of the message
    received.file.flush()
    received.write(b"more")
    assert received.error is not None and received.error.errno == 28  # ENOSPC
    assert Path(received.name).stat().st_size == 0  # truncated: the disk space is given back
    received.close()


def test_files_of_an_ended_association_are_discarded_and_taken_ones_kept(tmp_path: Path) -> None:
    receive_to_disk.enable(tmp_path)
    try:
        made: dict[str, receive_to_disk.ReceivedFile] = {}

        def receive(key: str) -> None:  # as pynetdicom's DUL thread would
            made[key] = receive_to_disk._open_received(delete=False, mode="wb", suffix=".dcm")
            made[key].write(b"data")
            made[key].flush()

        threads = {key: threading.Thread(target=receive, args=(key,)) for key in ("taken", "abandoned")}
        for t in threads.values():
            t.start()
            t.join()
        assert {Path(f.name).parent for f in made.values()} == {tmp_path}
        assert receive_to_disk.take(made["taken"].name) is None
        assert receive_to_disk.discard() == 1  # only the one no handler took: its thread has ended
        assert not Path(made["abandoned"].name).exists()
        assert Path(made["taken"].name).exists()
    finally:
        receive_to_disk.disable(tmp_path)
    from pynetdicom import _config

    assert _config.STORE_RECV_CHUNKED_DATASET is False  # the last gateway to stop restores pynetdicom's default


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="shared DICOM data not found")
@pytest.mark.parametrize("cut", [None, 200, 5000, -1000])
def test_completeness_of_a_file_is_that_of_its_bytes(tmp_path: Path, cut: int | None) -> None:
    sources = sorted(SHARED_DICOM.glob("*.dcm")) + sorted(REALWORLD.glob("*.dcm"))
    assert sources
    import pydicom

    for source in sources:
        raw = source.read_bytes()[:cut]
        try:
            ts = str(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:
            continue  # files without a readable meta are refused before this check
        path = tmp_path / source.name
        path.write_bytes(raw)
        assert incompleteness(path, ts) == incompleteness(raw, ts), source.name
