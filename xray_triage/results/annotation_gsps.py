"""A specialist's marks on one image as a Grayscale Softcopy Presentation State.

The marks are stored in source pixel coordinates (x = column, y = row, ``consult_schema.
Annotation``), which is what GSPS PIXEL units are (PS3.3 C.10.5.1.2), so they are copied as
they are: rect -> closed polyline, ellipse -> ELLIPSE (major then minor axis end points),
arrow -> two-point polyline, freehand -> polyline, text and every label -> a text object. They
go on their own layers, one per author (``MARKS``, ``MARKS2``...), each described with its
author and the time of their newest mark; the Content Creator's Name is the newest mark's author
and the creation date/time is when the object was made. With no mark left there is one empty
``MARKS`` layer (a new version that shows the image without marks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    TextObject,
)
from pydicom.dataset import Dataset

from xray_triage.results.ai_gsps import finish_gsps
from xray_triage.results.common import (
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    SOFTWARE,
    make_uid,
    person_name,
    series_uid,
)
from xray_triage.results.presentation import presentation_state

KIND = "annotation-gsps"
LAYER = "MARKS"


@dataclass(frozen=True)
class Mark:
    """One stored annotation: ``kind`` and ``geometry`` as in ``consult_schema.Annotation``."""

    id: int
    kind: str
    geometry: dict[str, Any]
    label: str
    author: str
    updated_at: datetime | None


def _graphic(mark: Mark) -> tuple[GraphicTypeValues, np.ndarray] | None:
    g = mark.geometry
    if mark.kind == "rect":
        x, y, w, h = (float(g[k]) for k in ("x", "y", "w", "h"))
        points = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        return GraphicTypeValues.POLYLINE, np.array(points, dtype=np.float32)
    if mark.kind == "ellipse":
        cx, cy, rx, ry = (float(g[k]) for k in ("cx", "cy", "rx", "ry"))
        if rx >= ry:
            points = [[cx - rx, cy], [cx + rx, cy], [cx, cy - ry], [cx, cy + ry]]
        else:
            points = [[cx, cy - ry], [cx, cy + ry], [cx - rx, cy], [cx + rx, cy]]
        return GraphicTypeValues.ELLIPSE, np.array(points, dtype=np.float32)
    if mark.kind == "arrow":
        points = [[float(g["x1"]), float(g["y1"])], [float(g["x2"]), float(g["y2"])]]
        return GraphicTypeValues.POLYLINE, np.array(points, dtype=np.float32)
    if mark.kind == "freehand" and len(g.get("points", [])) >= 2:
        return GraphicTypeValues.POLYLINE, np.array(
            [[float(x), float(y)] for x, y in g["points"]], dtype=np.float32
        )
    return None


def _anchor(mark: Mark) -> tuple[float, float]:
    g = mark.geometry
    for xk, yk in (("x", "y"), ("cx", "cy"), ("x1", "y1")):
        if xk in g and yk in g:
            return float(g[xk]), float(g[yk])
    points = g.get("points") or [[0.0, 0.0]]
    return float(points[0][0]), float(points[0][1])


def _objects(
    marks: list[Mark], uid_root: str, content_sha256: str
) -> tuple[list[GraphicObject], list[TextObject]]:
    graphics: list[GraphicObject] = []
    texts: list[TextObject] = []
    for mark in marks:
        shape = _graphic(mark)
        if shape is not None:
            graphics.append(
                GraphicObject(
                    graphic_type=shape[0],
                    graphic_data=shape[1],
                    units=AnnotationUnitsValues.PIXEL,
                    tracking_id=f"mark {mark.id}",
                    tracking_uid=make_uid(uid_root, "mark", str(mark.id), content_sha256),
                )
            )
        text = mark.label.strip()
        if text:
            texts.append(
                TextObject(
                    text_value=text[:1024],
                    units=AnnotationUnitsValues.PIXEL,
                    anchor_point=_anchor(mark),
                    anchor_point_visible=mark.kind == "text",
                )
            )
    return graphics, texts


def build_annotation_gsps(
    source: Dataset, marks: list[Mark], *, uid_root: str, version: int, content_sha256: str, now: datetime
) -> Dataset:
    """The marks over ``source`` (its header), oldest first: one layer per author (``MARKS``,
    ``MARKS2``... in the order of each author's first mark), described as "Marks by <author>,
    <time of their newest mark>" (PS3.3 C.10.7: the layer description is free text)."""
    by_author: dict[str, list[Mark]] = {}
    for mark in marks:
        by_author.setdefault(mark.author, []).append(mark)
    layers: list[GraphicLayer] = []
    annotations: list[GraphicAnnotation] = []
    for order, (author, own) in enumerate(by_author.items(), start=1):
        newest_at = max((m.updated_at for m in own if m.updated_at is not None), default=None)
        when = f", {newest_at.strftime('%Y-%m-%d %H:%M')}" if newest_at is not None else ""
        layer = GraphicLayer(
            layer_name=LAYER if order == 1 else f"{LAYER}{order}",
            order=order,
            description=f"Marks by {author or 'unknown'}{when}"[:64],
        )
        layers.append(layer)
        graphics, texts = _objects(own, uid_root, content_sha256)
        annotations.append(
            GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=layer,
                graphic_objects=graphics or None,
                text_objects=texts or None,
            )
        )
    if not layers:
        layers.append(GraphicLayer(layer_name=LAYER, order=1, description="Specialist marks (none left)"))
    authors = [m for m in marks if m.author]
    newest = max(authors, key=lambda m: (m.updated_at is not None, m.updated_at or now, m.id), default=None)
    gsps = presentation_state(
        source,
        series_instance_uid=series_uid(uid_root, str(source.StudyInstanceUID), KIND),
        series_number=SERIES_NUMBERS[KIND],
        sop_instance_uid=make_uid(uid_root, KIND, str(source.SOPInstanceUID), content_sha256),
        instance_number=version,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=SOFTWARE,
        device_serial_number=SOFTWARE,
        content_label="SPECIALIST_MARKS",
        content_description="Specialist marks from the teleconsult",
        graphic_annotations=annotations or None,
        graphic_layers=layers,
        content_creator_name=person_name(newest.author) if newest else None,
        institution_name=source.get("InstitutionName") or None,
        series_description=SERIES_DESCRIPTIONS[KIND],
    )
    finish_gsps(gsps, source, now)
    return gsps
