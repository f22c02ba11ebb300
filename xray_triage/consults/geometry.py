"""Where a mark may be: one shape per kind, finite numbers, on the image (plus a margin).

Geometry is in the ORIGINAL image's pixel coordinates (x = column, y = row), so a mark
stays on the anatomy at any zoom, render size or window. The database must never hold
a mark that some viewer cannot draw, so every writer (the web API today, an importer
tomorrow) validates with ``parse_geometry`` and ``check_bounds``; both raise ValueError
with a short English reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xray_triage.store.schema import Instance

Kind = Literal["rect", "ellipse", "arrow", "freehand", "text"]
MAX_POINTS = 5000
MARGIN_FRACTION = 0.05  # marks may reach a little past the edge (an arrow pointing in, a loose ellipse)
UNKNOWN_SIDE = 65535  # largest Rows/Columns DICOM allows, when the stored row lacks them

Coord = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Extent = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def points(self) -> list[tuple[float, float]]:
        """Points that must lie inside the image (x, y)."""
        raise NotImplementedError


class RectShape(Shape):
    x: Coord
    y: Coord
    w: Extent
    h: Extent

    def points(self) -> list[tuple[float, float]]:
        return [(self.x, self.y), (self.x + self.w, self.y + self.h)]


class EllipseShape(Shape):
    cx: Coord
    cy: Coord
    rx: Extent
    ry: Extent

    def points(self) -> list[tuple[float, float]]:
        return [(self.cx - self.rx, self.cy - self.ry), (self.cx + self.rx, self.cy + self.ry)]


class ArrowShape(Shape):
    x1: Coord
    y1: Coord
    x2: Coord
    y2: Coord

    def points(self) -> list[tuple[float, float]]:
        return [(self.x1, self.y1), (self.x2, self.y2)]


class FreehandShape(Shape):
    points_: list[tuple[Coord, Coord]] = Field(alias="points", min_length=2, max_length=MAX_POINTS)

    def points(self) -> list[tuple[float, float]]:
        return list(self.points_)

    def as_geometry(self) -> dict[str, Any]:
        return {"points": [[x, y] for x, y in self.points_]}


class TextShape(Shape):
    x: Coord
    y: Coord

    def points(self) -> list[tuple[float, float]]:
        return [(self.x, self.y)]


SHAPES: dict[str, type[Shape]] = {
    "rect": RectShape,
    "ellipse": EllipseShape,
    "arrow": ArrowShape,
    "freehand": FreehandShape,
    "text": TextShape,
}


def parse_geometry(kind: str, raw: Any) -> Shape:
    """The geometry as its kind's shape; ValueError with a short reason when it does not fit."""
    if not isinstance(raw, dict):
        raise ValueError(f"geometry must be an object for kind {kind!r}")
    try:
        return SHAPES[kind].model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'geometry'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid {kind} geometry: {problems}") from None


def geometry_json(shape: Shape) -> dict[str, Any]:
    if isinstance(shape, FreehandShape):
        return shape.as_geometry()
    return shape.model_dump()


def check_bounds(shape: Shape, instance: Instance) -> None:
    """ValueError unless every point of the shape lies on the image (plus a small margin)."""
    cols, rows = instance.columns or UNKNOWN_SIDE, instance.rows or UNKNOWN_SIDE
    margin = MARGIN_FRACTION * max(rows, cols)
    for x, y in shape.points():
        if not (-margin <= x <= cols + margin and -margin <= y <= rows + margin):
            raise ValueError(f"geometry outside the image ({cols}x{rows} px): point ({x:g}, {y:g})")
