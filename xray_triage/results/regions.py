"""Where the model looked, in source pixels: the hot part of a stored heatmap record."""

from __future__ import annotations

from typing import Any

import numpy as np

HOT_LEVEL = 0.5  # grid values are scaled 0..1 per label (triage/heatmaps.py); at or above this is "hot"


def hot_box(
    record: dict[str, Any] | None, level: float = HOT_LEVEL
) -> tuple[float, float, float, float] | None:
    """The bounding box ``(top, left, height, width)`` in source pixels of the grid cells at or
    above ``level``, inside the record's ``box``; None without a usable record."""
    if not record or "grid" not in record or "box" not in record:
        return None
    grid = np.asarray(record["grid"], dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        return None
    top, left, height, width = (float(v) for v in record["box"])
    rows, cols = np.nonzero(grid >= level)
    if rows.size == 0:
        return top, left, height, width
    cell_h, cell_w = height / grid.shape[0], width / grid.shape[1]
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return top + r0 * cell_h, left + c0 * cell_w, (r1 - r0) * cell_h, (c1 - c0) * cell_w


def outline(box: tuple[float, float, float, float]) -> np.ndarray:
    """The closed outline of a box as (column, row) points, as SCOORD and GSPS PIXEL data want them."""
    top, left, height, width = box
    right, bottom = left + width, top + height
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=np.float32
    )
