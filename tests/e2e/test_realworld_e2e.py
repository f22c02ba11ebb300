"""End to end: every real-world-shaped file sent with storescu is stored, triaged and shown right.

One real ``xray-triage serve`` receives each file of ``../shared/data/dicom-realworld`` from
dcmtk's ``storescu``; each must be stored byte-identical (outside the File Meta group), get a
final AI result (``done``), and the viewer's render route, fetched over HTTP after a real
login, must answer 200 with the picture dcmtk's ``dcmj2pnm`` makes of the same file.
A 2800 x 2800 file sent to a server whose frame limit is 2 megapixels is stored, never
decoded, and both the triage reason and the viewer say why.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from web_helpers import login

from e2e_helpers import SHARED_DICOM, Server, dataset_bytes, read_uids, store_ok

pytestmark = pytest.mark.slow

REALWORLD = SHARED_DICOM.parent / "dicom-realworld"
SPECIALIST, SPECIALIST_PASSWORD = "e2e-specialist", "e2e-specialist-password"  # made by create_api_user
# How dcmtk shows each kind (its manifest says what a correct server does): the reference options.
DCMTK_OPTIONS = {
    "rwd_01": ("+Wl", "1", "+Mv"),
    "rwd_02": ("+Wi", "1"),
    "rwd_03": ("+Wi", "1"),
    "rwd_04": ("+Wn",),
    "rwd_05": (),
    "rwd_06": ("+Ww", "2047.5", "4096"),
    "rwd_07": ("+Wm",),
    "rwd_08": ("+Wm",),
}
BIG_FILE = SHARED_DICOM / "dev_08_dx_pa_2800px_jpegls.dcm"  # 7.8 megapixels


@pytest.fixture(scope="module")
def server(module_launcher: Any) -> Server:
    if not (REALWORLD / "manifest.csv").is_file():
        pytest.skip(f"shared real-world DICOM not found: {REALWORLD}")
    return module_launcher.launch("realworld", env={"XRAY_TRIAGE_MAX_FRAME_MEGAPIXELS": "2"})


@pytest.fixture(scope="module")
def sent(server: Server) -> dict[str, tuple[Path, Any, dict[str, Any]]]:
    files = sorted(REALWORLD.glob("rwd_*.dcm"))
    assert {f.name[:6] for f in files} == set(DCMTK_OPTIONS), "a real-world kind has no reference options"
    uids = {}
    for path in [*files, BIG_FILE]:
        store_ok([path], server.dicom_port)
        uids[path.name] = (path, read_uids(path))
    studies = server.wait_final(u.study for _, u in uids.values())
    return {name: (path, u, studies[u.study]) for name, (path, u) in uids.items()}


@pytest.fixture(scope="module")
def browser(server: Server) -> httpx.Client:
    client = httpx.Client(base_url=server.url(""), timeout=60)
    login(client, SPECIALIST, SPECIALIST_PASSWORD)  # type: ignore[arg-type]
    return client


def dcmtk_grey(path: Path, out_dir: Path, options: tuple[str, ...]) -> np.ndarray:
    out = out_dir / f"{path.stem}.png"
    proc = subprocess.run(["dcmj2pnm", "+on", *options, str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return np.asarray(Image.open(out).convert("L"), dtype=np.float64)


def test_every_real_world_file_is_stored_byte_identical_and_triaged(
    server: Server, sent: dict[str, tuple[Path, Any, dict[str, Any]]]
) -> None:
    for name, (path, uids, study) in sent.items():
        if path == BIG_FILE:
            continue
        (image,) = study["images"]
        assert image["ai_status"] == "done", (name, image["ai_status"], image.get("ai_error"))
        assert image["result"] and image["result"]["probabilities"], name
        stored = server.data_dir / image["file_path"]
        assert dataset_bytes(stored) == dataset_bytes(path), f"{name}: stored data set differs from the one sent"
        assert image["sop_instance_uid"] == uids.sop, name


def test_viewer_shows_each_real_world_file_as_dcmtk_does(
    server: Server, sent: dict[str, tuple[Path, Any, dict[str, Any]]], browser: httpx.Client, tmp_path: Path
) -> None:
    for name, (path, uids, study) in sent.items():
        if path == BIG_FILE:
            continue
        (image,) = study["images"]
        rows, cols = image["rows"], image["columns"]
        response = browser.get(
            f"/studies/{uids.study}/images/{uids.sop}/render", params={"size": max(rows, cols), "format": "png"}
        )
        assert response.status_code == 200, (name, response.status_code, response.text[:300])
        ours = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"), dtype=np.float64)
        reference = dcmtk_grey(path, tmp_path, DCMTK_OPTIONS[name[:6]])
        assert ours.shape == reference.shape, name
        mask = np.ones(ours.shape, dtype=bool)
        if name.startswith("rwd_04"):  # compare the image, not the padding border (white in both)
            import pydicom

            ds = pydicom.dcmread(path)
            mask = ds.pixel_array != int(ds.PixelPaddingValue)
        correlation = float(np.corrcoef(ours[mask], reference[mask])[0, 1])
        assert correlation >= 0.95, f"{name}: viewer picture correlates {correlation:.3f} with dcmj2pnm"
        assert abs(ours[mask].mean() - reference[mask].mean()) <= 30, name


def test_image_over_the_frame_limit_is_stored_but_never_decoded(
    server: Server, sent: dict[str, tuple[Path, Any, dict[str, Any]]], browser: httpx.Client
) -> None:
    path, uids, study = sent[BIG_FILE.name]
    (image,) = study["images"]
    assert image["ai_status"] == "failed", image
    reason = image["ai_error"]
    assert "2800 x 2800" in reason and "over the limit of 2 megapixels" in reason and "not decoded" in reason, reason
    assert dataset_bytes(server.data_dir / image["file_path"]) == dataset_bytes(path)
    response = browser.get(f"/studies/{uids.study}/images/{uids.sop}/render")
    assert response.status_code == 422, response.status_code
    assert "megapixels" in response.text, response.text[:500]  # the detail, naming the limit
    assert "ảnh quá lớn" in response.text, response.text[:500]  # said in the user's language (vi)
    assert "Traceback" not in response.text and str(server.data_dir) not in response.text
    # The job failed once, permanently: an image that is too large is not retried.
    assert "triage failed" in server.log()
