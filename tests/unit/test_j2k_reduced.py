"""JPEG 2000 decoded only down to the resolution the model needs (``j2k_reduced_decode``).

The reduced decode must give the model what the full decode gives it, keep heatmaps
mapped onto the stored image's pixels, and fall back to the full decode (and its
clear errors) whenever it cannot be used.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, generate_uid

from e2e_helpers import SHARED_DATA
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
from xray_triage.settings import DEFAULT_MODEL_DIR
from xray_triage.triage.analyze import analyze_file
from xray_triage.triage.heatmaps import peak_in_source

SHARED_J2K = SHARED_DATA / "dicom" / "dev_06_dx_pa_j2k_lossless.dcm"
DEFAULT_MODEL = DEFAULT_MODEL_DIR  # the shipped model (package data)


def _j2k_dataset(pixels: np.ndarray, precision: int = 12) -> Dataset:
    """A 12-bit MONOCHROME2 DX dataset, JPEG 2000 lossless (openjpeg through pydicom).

    openjpeg writes the stream with ``precision`` = Bits Stored; ``precision=16`` makes a
    precision-16 stream of 12-bit data, as GDCM (and the shared dev_06 file) has it.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, precision, precision - 1, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.compress(JPEG2000Lossless, pixels.astype(np.uint16), encoding_plugin="pylibjpeg")
    ds.BitsStored, ds.HighBit = 12, 11
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


def test_precision_16_streams_and_edge_overshoot_keep_the_stored_values(tmp_path: Path) -> None:
    """GDCM writes 12-bit data as a precision-16 stream; the reduced decode's overshoot at hard
    edges must then be clipped to Bits Stored, not wrapped by the Bits Stored mask."""
    blocks = np.kron(np.indices((8, 8)).sum(axis=0) % 2, np.ones((64, 64))) * 4095  # hard 0 / 4095 edges
    ds = _j2k_dataset(blocks, precision=16)
    reduced = decode_j2k_reduced(ds, 128)
    assert reduced is not None and reduced.shape == (128, 128)
    assert int(reduced.max()) == 4095  # the overshoot (> 4095) is clipped ...
    full = dataset_to_display(ds).pixels
    small = dataset_to_display(ds, min_side=128).pixels
    block_means = full.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    assert np.abs(small - block_means).max() < 0.5  # ... never wrapped to black (a wrap is ~1.0)
    assert np.abs(small - block_means).mean() < 0.05


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


def test_viewer_first_view_decodes_reduced_and_a_zoom_decodes_in_full(tmp_path: Path) -> None:
    from xray_triage.pipeline import render as R

    rows, cols = 1200, 2400
    gradient = np.linspace(300, 3000, cols)[None, :].repeat(rows, axis=0)
    gradient[400:700, 1500:1800] = 4000  # something to see
    path = tmp_path / "wide.dcm"
    _j2k_dataset(gradient).save_as(path, enforce_file_format=True)
    cache = R.ImageCache(2)

    first = cache.get(path, source="wide", size=1024)
    assert first.decoded_shape == (600, 1200) and first.shape == (rows, cols)  # half size covers 1024 x 512
    assert R.windows_info(first)["rows"] == rows and R.windows_info(first)["columns"] == cols
    full = R.load_image(path)  # no size: always in full
    assert full.decoded_shape == (rows, cols)
    a = np.asarray(Image.open(io.BytesIO(R.render(first, size=1024, fmt="png").data)), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(R.render(full, size=1024, fmt="png").data)), dtype=np.float64)
    assert a.shape == b.shape == (512, 1024)
    # The same picture. Not identical: at the patch's one-pixel 1000-unit step (far sharper than
    # anatomy) the wavelet low-pass overshoots, which widens the min/max window by ~2.5 %.
    diff = np.abs(a - b)
    assert diff.mean() < 4.0 and np.percentile(diff, 99) < 10.0, (diff.mean(), np.percentile(diff, 99))
    with pytest.raises(ValueError, match="needs more than"):
        R.render(first, size=cols)  # never an upscaled reduced decode

    zoomed = cache.get(path, source="wide", size=cols)
    assert zoomed is not first and zoomed.decoded_shape == (rows, cols)
    assert zoomed.presets == first.presets and zoomed.value_range == first.value_range  # no jump on zoom
    assert cache.get(path, source="wide", size=1024) is zoomed  # the full decode serves every size now


@pytest.mark.skipif(not SHARED_J2K.is_file(), reason="shared DICOM files not found")
def test_viewer_decodes_other_syntaxes_in_full_whatever_the_size() -> None:
    from xray_triage.pipeline import render as R

    jpeg_ls = SHARED_J2K.parent / "dev_08_dx_pa_2800px_jpegls.dcm"
    image = R.ImageCache(1).get(jpeg_ls, size=64)
    assert image.decoded_shape == image.shape == (2800, 2800)


def test_models_evaluate_decodes_as_the_server_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models evaluate`` follows ``j2k_reduced_decode``, so it measures what the server would do."""
    from xray_triage.evaluation import evaluate as E
    from xray_triage_server.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for n, level in enumerate((600, 3000)):
        _j2k_dataset(_patch_pixels(600, 600, 10, 10, 50) * 0 + level).save_as(
            data / "images" / f"x{n}.dcm", enforce_file_format=True
        )
    (data / "labels.csv").write_text("file,finding_labels,abnormal\nx0.dcm,No Finding,0\nx1.dcm,Effusion,1\n")
    model = write_tiny_model_dir(tmp_path / "model").parent
    seen: list[int] = []
    real = E.read_any_display
    monkeypatch.setattr(E, "read_any_display", lambda path, *, min_side=0: seen.append(min_side) or real(path, min_side=min_side))
    assert main(["models", "evaluate", "--model", str(model), "--data", str(data), "--bootstrap", "20"]) == 0
    assert seen == [128, 128]  # the tiny model's 64 px input, times two
    monkeypatch.setenv("XRAY_TRIAGE_J2K_REDUCED_DECODE", "false")
    assert main(["models", "evaluate", "--model", str(model), "--data", str(data), "--bootstrap", "20"]) == 0
    assert seen[2:] == [0, 0]
