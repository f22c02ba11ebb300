"""JPEG 2000 decoded only down to the resolution the model needs (``j2k_reduced_decode``).

The reduced decode must give the model what the full decode gives it, keep heatmaps
mapped onto the stored image's pixels, and fall back to the full decode (and its
clear errors) whenever it cannot be used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, generate_uid

from onnx_factory import write_tiny_model_dir
from xray_triage.inference.card import load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import (
    PixelError,
    dataset_to_display,
    decode_j2k_reduced,
    j2k_reduce_factor,
    read_dicom_display,
)
from xray_triage.pipeline.preprocess import decode_min_side, to_model_input
from xray_triage.triage.analyze import analyze_file
from xray_triage.triage.heatmaps import peak_in_source

SHARED_J2K = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dev_06_dx_pa_j2k_lossless.dcm"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def _j2k_dataset(pixels: np.ndarray) -> Dataset:
    """A 12-bit MONOCHROME2 DX dataset, JPEG 2000 lossless (openjpeg through pydicom)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.compress(JPEG2000Lossless, pixels.astype(np.uint16), encoding_plugin="pylibjpeg")
    return ds


def _patch_pixels(rows: int, cols: int, top: int, left: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pixels = rng.normal(900, 60, (rows, cols)).clip(0, 4095)
    pixels[top : top + size, left : left + size] = 3800
    return pixels


def test_reduce_factor_keeps_the_shorter_side_above_the_minimum() -> None:
    assert j2k_reduce_factor(2800, 2800, 448) == 2  # 700 px
    assert j2k_reduce_factor(1024, 1024, 448) == 1  # 512 px
    assert j2k_reduce_factor(1200, 1600, 128) == 3  # 150 x 200
    assert j2k_reduce_factor(800, 3000, 448) == 0  # the short side is already under 2 x 448
    assert j2k_reduce_factor(897, 897, 448) == 1  # ceil(897 / 2) = 449


@pytest.mark.skipif(not SHARED_J2K.is_file(), reason="shared DICOM files not found")
def test_reduced_decode_gives_the_model_what_the_full_decode_gives_it() -> None:
    """dev_06 was encoded by GDCM, not by us: the reduced decode is half size, same picture."""
    card = load_card(DEFAULT_MODEL)
    full = read_dicom_display(SHARED_J2K)
    reduced = read_dicom_display(SHARED_J2K, min_side=decode_min_side(card.input))
    assert full.pixels.shape == (1024, 1024) and reduced.pixels.shape == (512, 512)
    assert reduced.source_shape == full.source_shape == (1024, 1024)
    a, b = to_model_input(full.pixels, card.input), to_model_input(reduced.pixels, card.input)
    assert float(np.abs(a - b).mean()) * card.input.std[0] < 0.01  # in display units (0..1)
    runner = ModelRunner(card)
    pa, pb = runner.run(a[None]).probabilities[0], runner.run(b[None]).probabilities[0]
    assert np.abs(pa - pb).max() < 0.02
    # Without a minimum the image is decoded in full, as before.
    assert read_dicom_display(SHARED_J2K, min_side=0).pixels.shape == (1024, 1024)


def test_heatmap_of_a_reduced_decode_lands_on_the_patch_in_stored_pixels(tmp_path: Path) -> None:
    """A non-square 1200 x 1600 J2K image with a bright patch off centre, decoded at 1/8."""
    top, left, size = 840, 260, 160
    path = tmp_path / "patch.dcm"
    _j2k_dataset(_patch_pixels(1200, 1600, top, left, size)).save_as(path, enforce_file_format=True)
    card_path = write_tiny_model_dir(tmp_path / "model", thresholds={"Abnormal": 0.0, "Effusion": 0.99, "Pneumothorax": 0.99})
    runner = ModelRunner(load_card(card_path))
    assert read_dicom_display(path, min_side=decode_min_side(runner.card.input)).pixels.shape == (150, 200)
    analysis = analyze_file(path, runner)  # reduced_decode is the default, as in the server
    assert analysis.source_shape == (1200, 1600)
    record = analysis.heatmaps["Abnormal"]
    assert record["box"] == [0, 0, 1200, 1600]
    row, col = peak_in_source(record)
    grid = np.asarray(record["grid"])
    cell_h, cell_w = 1200 / grid.shape[0], 1600 / grid.shape[1]
    assert top - cell_h <= row <= top + size + cell_h, (row, col)
    assert left - cell_w <= col <= left + size + cell_w, (row, col)
    same = analyze_file(path, runner, reduced_decode=False)
    assert same.heatmaps["Abnormal"]["box"] == record["box"]
    assert peak_in_source(same.heatmaps["Abnormal"]) == (row, col)


def test_cases_it_does_not_take_fall_back_to_the_full_decode(tmp_path: Path) -> None:
    ds = _j2k_dataset(_patch_pixels(600, 600, 10, 10, 50))
    assert decode_j2k_reduced(ds, 128).shape == (150, 150)
    signed = _j2k_dataset(_patch_pixels(600, 600, 10, 10, 50))
    signed.PixelRepresentation = 1
    assert decode_j2k_reduced(signed, 128) is None
    assert decode_j2k_reduced(ds, 600) is None  # nothing to gain
    raw = Dataset()
    raw.file_meta = FileMetaDataset()
    raw.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    raw.Rows = raw.Columns = 600
    assert decode_j2k_reduced(raw, 128) is None  # not JPEG 2000


def test_a_broken_stream_still_gets_the_full_decoders_clear_error(tmp_path: Path) -> None:
    ds = _j2k_dataset(_patch_pixels(600, 600, 10, 10, 50))
    frame = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)
    truncated = next(frame)[:200]
    ds.PixelData = pydicom.encaps.encapsulate([truncated])
    assert decode_j2k_reduced(ds, 128) is None
    with pytest.raises(PixelError, match="cannot decode Pixel Data"):
        dataset_to_display(ds, source="broken.dcm", min_side=128)
