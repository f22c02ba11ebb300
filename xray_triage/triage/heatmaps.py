"""Heatmaps that land on the original image, whatever the model's geometry.

A model's class-activation map covers the region of the source image the model
was shown (the whole image when the card says ``squash``, the centred square for
``center_crop``), stretched to the model's input size. We store each flagged
label's map as a small grid plus that region in *source pixel coordinates*: a
viewer stretches the grid over the box and the hot spots sit on the anatomy
that produced them, with no knowledge of the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xray_triage.inference.card import InputSpec
from xray_triage.pipeline.preprocess import model_crop_box


def heatmap_records(
    heatmaps: np.ndarray,
    labels: tuple[str, ...],
    wanted: list[str],
    source_shape: tuple[int, int],
    spec: InputSpec,
) -> dict[str, dict[str, Any]]:
    """One record per wanted label: grid scaled to 0..1, its raw range, and its box.

    ``heatmaps`` is one image's (labels, h, w) output. ``box`` is
    ``[top, left, height, width]`` in source pixels; grid cell (i, j) covers rows
    top + i*height/h .. top + (i+1)*height/h, and likewise for columns.
    """
    box = model_crop_box(source_shape[0], source_shape[1], spec)
    records: dict[str, dict[str, Any]] = {}
    for label in wanted:
        grid = np.asarray(heatmaps[labels.index(label)], dtype=np.float64)
        low, high = float(grid.min()), float(grid.max())
        scaled = (grid - low) / (high - low) if high > low else np.zeros_like(grid)
        records[label] = {
            "grid": np.round(scaled, 3).tolist(),
            "raw_range": [round(low, 6), round(high, 6)],
            "box": [box.top, box.left, box.height, box.width],
            "source_shape": list(source_shape),
        }
    return records


def cell_centre(record: dict[str, Any], i: int, j: int) -> tuple[float, float]:
    """Row, column (source pixels) of the centre of grid cell (i, j)."""
    rows, cols = np.asarray(record["grid"]).shape
    top, left, height, width = record["box"]
    return top + (i + 0.5) * height / rows, left + (j + 0.5) * width / cols


def peak_in_source(record: dict[str, Any]) -> tuple[float, float]:
    """Row, column (source pixels) of the centre of the hottest grid cell."""
    grid = np.asarray(record["grid"])
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return cell_centre(record, int(i), int(j))
