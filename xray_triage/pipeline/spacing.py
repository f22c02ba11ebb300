"""Physical pixel size of a projection radiograph, for distance measurements in mm.

DICOM gives two spacings (PS3.3 §10.7.1.1 "Pixel Spacing" and §C.8.11.1.1.1 for DX):

* ``PixelSpacing`` (0028,0030): spacing in the patient (calibrated or, for DX,
  corrected to the patient plane). Preferred when present.
* ``ImagerPixelSpacing`` (0018,1164): spacing at the detector front plane. Objects in
  the patient are magnified by the beam's divergence, so the detector spacing is
  divided by ``EstimatedRadiographicMagnificationFactor`` (0018,1114) when the file
  gives one; without it the distance is at the detector plane and is said to be so.

A file with neither has no physical scale: no millimetres are shown for it.
Both attributes are ``[row spacing, column spacing]`` in mm, i.e. the vertical
distance between row centres first, then the horizontal distance between columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PIXEL_SPACING = "PixelSpacing"
IMAGER_PIXEL_SPACING = "ImagerPixelSpacing"
MAGNIFICATION = "EstimatedRadiographicMagnificationFactor"


@dataclass(frozen=True)
class Spacing:
    """mm per pixel: ``row_mm`` vertically (between rows), ``column_mm`` horizontally.

    ``source`` is the DICOM keyword used; ``magnification`` the factor the imager
    spacing was divided by (None when not applied).
    """

    row_mm: float
    column_mm: float
    source: str
    magnification: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "row_mm": self.row_mm,
            "column_mm": self.column_mm,
            "source": self.source,
            "magnification": self.magnification,
        }


def _pair(value: Any) -> tuple[float, float] | None:
    """Two positive finite numbers from a DS value with VM 2 (a single value counts for both)."""
    if value is None or value == "":
        return None
    try:
        items = [float(value)] if isinstance(value, (str, bytes, int, float)) else [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(items) == 1:
        items = items * 2
    if len(items) != 2 or not all(math.isfinite(v) and v > 0 for v in items):
        return None
    return items[0], items[1]


def _factor(value: Any) -> float | None:
    try:
        factor = float(value)
    except (TypeError, ValueError):
        return None
    return factor if math.isfinite(factor) and factor > 0 else None


def pixel_spacing(ds: Any) -> Spacing | None:
    """The spacing to measure with from a pydicom dataset (header only is enough), or None.

    ``PixelSpacing`` first; else ``ImagerPixelSpacing`` divided by
    ``EstimatedRadiographicMagnificationFactor`` when present and positive. Invalid
    values (missing, zero, negative, not numbers) count as absent.
    """
    pair = _pair(ds.get(PIXEL_SPACING))
    if pair is not None:
        return Spacing(pair[0], pair[1], PIXEL_SPACING)
    pair = _pair(ds.get(IMAGER_PIXEL_SPACING))
    if pair is None:
        return None
    factor = _factor(ds.get(MAGNIFICATION))
    if factor is None:
        return Spacing(pair[0], pair[1], IMAGER_PIXEL_SPACING)
    return Spacing(pair[0] / factor, pair[1] / factor, IMAGER_PIXEL_SPACING, magnification=factor)


def distance_mm(spacing: Spacing, dx_px: float, dy_px: float) -> float:
    """Length in mm of a segment ``dx_px`` columns wide and ``dy_px`` rows tall."""
    return math.hypot(dx_px * spacing.column_mm, dy_px * spacing.row_mm)
