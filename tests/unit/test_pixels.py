"""The pixel pipeline against the PNGs the shared DICOM files were made from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from e2e_helpers import SHARED_DATA
from xray_triage.inference.card import InputSpec
from xray_triage.pipeline.pixels import PixelError, dataset_to_display, read_any_display, read_dicom_display
from xray_triage.pipeline.preprocess import to_model_input

SHARED = SHARED_DATA
DICOM_DIR = SHARED / "dicom"
PNG_DIR = SHARED / "cxr" / "images"

pytestmark = pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"shared data not found at {SHARED}")


def manifest() -> list[dict[str, str]]:
    if not DICOM_DIR.is_dir():
        return []
    with open(DICOM_DIR / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


SPEC = InputSpec(name="image", height=256, width=256)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).ravel()
    return (x - x.mean()) / x.std()


@pytest.mark.parametrize("row", manifest(), ids=lambda r: r["file"])
def test_every_shared_dicom_matches_its_png(row: dict[str, str]) -> None:
    """Decode + modality LUT + VOI + MONOCHROME1 inversion reproduces the source picture."""
    ds = pydicom.dcmread(DICOM_DIR / row["file"])
    assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
    assert ds.PhotometricInterpretation == row["photometric"]
    image = read_dicom_display(DICOM_DIR / row["file"])
    assert image.source_shape == (int(row["rows"]), int(row["cols"]))
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    png = read_any_display(PNG_DIR / row["source_png"])
    # Compare what the model sees: both through the same preprocessing.
    ours = to_model_input(image.pixels, SPEC)[0]
    reference = to_model_input(png.pixels, SPEC)[0]
    corr = float(np.mean(_normalised(ours) * _normalised(reference)))
    assert corr > 0.99, f"{row['file']}: correlation {corr:.4f} with {row['source_png']}"


def test_monochrome1_is_inverted_so_bright_means_dense() -> None:
    row = next(r for r in manifest() if r["photometric"] == "MONOCHROME1")
    image = read_dicom_display(DICOM_DIR / row["file"])
    png = np.asarray(Image.open(PNG_DIR / row["source_png"]).convert("L"), dtype=np.float32) / 255
    # Without inversion the correlation would be close to -1.
    assert np.corrcoef(image.pixels.ravel(), png.ravel())[0, 1] > 0.99


def test_window_from_header_is_applied_in_rescaled_units() -> None:
    """dev_04 has RescaleSlope 2, Intercept -1024 and a window in rescaled units."""
    ds = pydicom.dcmread(DICOM_DIR / "dev_04_cr_pa_rescale_jpegls.dcm")
    image = dataset_to_display(ds)
    assert image.window == "window"
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    stored = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.abs(image.pixels - expected).max() < 1e-3


def test_bits_above_bits_stored_are_ignored() -> None:
    ds = pydicom.dcmread(DICOM_DIR / "dev_07_dx_pa_utf8_name.dcm")
    clean = dataset_to_display(ds).pixels
    noisy = ds.pixel_array | np.uint16(0xF000)  # garbage in the 4 unused high bits
    ds.PixelData = noisy.tobytes()
    assert np.array_equal(dataset_to_display(ds).pixels, clean)


def test_dataset_without_pixel_data_is_a_clear_error() -> None:
    ds = pydicom.dcmread(DICOM_DIR / "dev_01_dx_pa_explicit_window.dcm")
    del ds.PixelData
    with pytest.raises(PixelError, match="no Pixel Data"):
        dataset_to_display(ds, source="x.dcm")


def test_colour_image_is_refused_with_the_tag_named() -> None:
    ds = pydicom.dcmread(DICOM_DIR / "dev_01_dx_pa_explicit_window.dcm")
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(PixelError, match=r"\(0028,0004\)"):
        dataset_to_display(ds)


def test_not_a_dicom_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "random.dcm"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(PixelError, match="random.dcm"):
        read_dicom_display(bad)


def test_rgba_png_is_read_as_grey() -> None:
    png = PNG_DIR / "00004934_000.png"  # stored RGBA by NIH
    if not png.exists():
        pytest.skip("RGBA sample not present")
    image = read_any_display(png)
    assert image.pixels.ndim == 2 and image.pixels.max() > 0.5
