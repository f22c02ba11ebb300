"""Heatmaps map back onto the source image through the card's crop and resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_factory import write_tiny_model_dir
from xray_triage.inference.card import load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import DisplayImage
from xray_triage.triage.analyze import analyze_display
from xray_triage.triage.heatmaps import peak_in_source


def _runner(tmp_path: Path, resize: str) -> ModelRunner:
    card_path = write_tiny_model_dir(tmp_path / resize, thresholds={"Abnormal": 0.0, "Effusion": 0.99, "Pneumothorax": 0.99})
    card_path.write_text(card_path.read_text().replace('resize = "squash"', f'resize = "{resize}"'))
    return ModelRunner(load_card(card_path))


def _patch_image(rows: int, cols: int, top: int, left: int, size: int) -> DisplayImage:
    pixels = np.full((rows, cols), 0.1, dtype=np.float32)
    pixels[top : top + size, left : left + size] = 1.0
    return DisplayImage(pixels=pixels, source_shape=(rows, cols), window="minmax")


@pytest.mark.parametrize(
    ("resize", "patch_top", "patch_left"),
    [("squash", 200, 60), ("center_crop", 30, 330), ("center_crop", 220, 110)],
)
def test_heatmap_peak_lands_on_an_off_centre_patch(tmp_path: Path, resize: str, patch_top: int, patch_left: int) -> None:
    """A non-square 300x500 image with a bright 48-px patch off centre; the tiny model's
    activation is local brightness, so its peak must map back onto the patch."""
    runner = _runner(tmp_path, resize)
    image = _patch_image(300, 500, patch_top, patch_left, 48)
    analysis = analyze_display(image, runner, decode_ms=0.0)
    assert analysis.score.flagged == ["Abnormal"]  # only flagged labels get a heatmap
    record = analysis.heatmaps["Abnormal"]
    expected_box = [0, 0, 300, 500] if resize == "squash" else [0, 100, 300, 300]
    assert record["box"] == expected_box
    row, col = peak_in_source(record)
    grid = np.asarray(record["grid"])
    cell_h, cell_w = record["box"][2] / grid.shape[0], record["box"][3] / grid.shape[1]
    # The peak cell's centre lies within one cell of the patch.
    assert patch_top - cell_h <= row <= patch_top + 48 + cell_h, (row, col)
    assert patch_left - cell_w <= col <= patch_left + 48 + cell_w, (row, col)
    assert grid.max() == 1.0 and grid.min() == 0.0


def test_no_heatmaps_for_unflagged_labels(tmp_path: Path) -> None:
    runner = _runner(tmp_path, "squash")
    analysis = analyze_display(_patch_image(100, 100, 10, 10, 20), runner, decode_ms=0.0)
    assert set(analysis.heatmaps) == set(analysis.score.flagged)
