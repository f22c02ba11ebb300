"""Which pixel spacing a distance in mm is measured with (xray_triage.pipeline.spacing)."""

from __future__ import annotations

import math

import pytest
from pydicom.dataset import Dataset

from xray_triage.pipeline.spacing import IMAGER_PIXEL_SPACING, PIXEL_SPACING, distance_mm, pixel_spacing


def _ds(**tags: object) -> Dataset:
    ds = Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_pixel_spacing_is_preferred_over_imager_pixel_spacing() -> None:
    spacing = pixel_spacing(
        _ds(PixelSpacing=[0.2, 0.25], ImagerPixelSpacing=[0.3, 0.3], EstimatedRadiographicMagnificationFactor=1.2)
    )
    assert spacing is not None
    assert (spacing.row_mm, spacing.column_mm, spacing.source, spacing.magnification) == (0.2, 0.25, PIXEL_SPACING, None)


def test_imager_pixel_spacing_is_divided_by_the_magnification_factor() -> None:
    spacing = pixel_spacing(_ds(ImagerPixelSpacing=[0.3, 0.36], EstimatedRadiographicMagnificationFactor=1.2))
    assert spacing is not None and spacing.source == IMAGER_PIXEL_SPACING and spacing.magnification == 1.2
    assert spacing.row_mm == pytest.approx(0.25) and spacing.column_mm == pytest.approx(0.3)


@pytest.mark.parametrize("factor", [None, 0, -1, "abc"])
def test_imager_pixel_spacing_without_a_usable_factor_is_at_the_detector(factor: object) -> None:
    tags: dict[str, object] = {"ImagerPixelSpacing": [0.35, 0.35]}
    if factor is not None:
        tags["EstimatedRadiographicMagnificationFactor"] = factor
    ds = _ds(**{k: v for k, v in tags.items() if k != "EstimatedRadiographicMagnificationFactor"})
    if factor is not None:
        ds.add_new(0x00181114, "DS", None)
        ds["EstimatedRadiographicMagnificationFactor"]._value = factor  # raw, as a damaged file could carry
    spacing = pixel_spacing(ds)
    assert spacing is not None and spacing.magnification is None and spacing.row_mm == 0.35


@pytest.mark.parametrize("value", [None, [0, 0.2], [-0.1, 0.1], [float("nan"), 0.1]])
def test_no_usable_spacing_means_no_mm(value: object) -> None:
    ds = _ds() if value is None else _ds(PixelSpacing=value)
    assert pixel_spacing(ds) is None


def test_distance_uses_row_spacing_vertically_and_column_spacing_horizontally() -> None:
    spacing = pixel_spacing(_ds(PixelSpacing=[0.5, 0.1]))  # rows 0.5 mm apart, columns 0.1 mm apart
    assert spacing is not None
    assert distance_mm(spacing, 100, 0) == pytest.approx(10.0)  # 100 columns across
    assert distance_mm(spacing, 0, 100) == pytest.approx(50.0)  # 100 rows down
    assert distance_mm(spacing, 30, 40) == pytest.approx(math.hypot(3.0, 20.0))
