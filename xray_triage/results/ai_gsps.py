"""Where the model looked, as a Grayscale Softcopy Presentation State (IHE AIR), nothing burnt in.

One graphic layer ``AI`` on the source image: per flagged label with a heatmap, the outline
of the heatmap's hot region (``regions.hot_box``) as a closed polyline in PIXEL units (source
image columns/rows, origin at the top left corner of the top left pixel, PS3.3 C.10.5.1.2),
with the label and its probability as a text object. Any PACS viewer that shows GSPS draws it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    TextObject,
)
from pydicom.dataset import Dataset

from xray_triage.inference.card import ModelCard
from xray_triage.results.common import SERIES_DESCRIPTIONS, SERIES_NUMBERS, SOFTWARE, make_uid, series_uid
from xray_triage.results.presentation import presentation_state
from xray_triage.results.regions import hot_box, outline

KIND = "ai-gsps"
LAYER = "AI"


def build_ai_gsps(
    source: Dataset,
    flagged: Sequence[str],
    probabilities: Mapping[str, float],
    heatmaps: Mapping[str, Any],
    card: ModelCard,
    *,
    uid_root: str,
    version: int,
    content_sha256: str,
    now: datetime,
) -> Dataset:
    """The AI layer over ``source`` (its header). A flagged label without a heatmap gets only its
    text; with no flagged label the layer is empty (the image shown as is)."""
    layer = GraphicLayer(layer_name=LAYER, order=1, description=f"{card.model_version}: flagged regions"[:64])
    graphics: list[GraphicObject] = []
    texts: list[TextObject] = []
    rows, columns = int(source.Rows), int(source.Columns)
    for n, label in enumerate(flagged):
        caption = f"{label} {float(probabilities.get(label, 0.0)):.2f}"
        box = hot_box(heatmaps.get(label))
        if box is not None:
            points = outline(box)
            points[:, 0] = points[:, 0].clip(0, columns)
            points[:, 1] = points[:, 1].clip(0, rows)
            graphics.append(
                GraphicObject(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=points,
                    units=AnnotationUnitsValues.PIXEL,
                    tracking_id=f"AI {label}"[:64],
                    tracking_uid=make_uid(
                        uid_root, "gsps-tracking", str(source.SOPInstanceUID), label, content_sha256
                    ),
                )
            )
            anchor = (float(points[0, 0]), float(points[0, 1]))
        else:
            anchor = (columns * 0.02, rows * (0.04 + 0.04 * n))
        texts.append(
            TextObject(
                text_value=caption,
                units=AnnotationUnitsValues.PIXEL,
                anchor_point=anchor,
                anchor_point_visible=False,
            )
        )
    annotations = []
    if graphics or texts:
        annotations.append(
            GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=layer,
                graphic_objects=graphics or None,
                text_objects=texts or None,
            )
        )
    study_uid = str(source.StudyInstanceUID)
    gsps = presentation_state(
        source,
        series_instance_uid=series_uid(uid_root, study_uid, KIND),
        series_number=SERIES_NUMBERS[KIND],
        sop_instance_uid=make_uid(uid_root, KIND, str(source.SOPInstanceUID), content_sha256),
        instance_number=version,
        manufacturer=(card.manufacturer or SOFTWARE)[:64],
        manufacturer_model_name=card.name[:64],
        software_versions=card.version[:64],
        device_serial_number=card.sha256,
        content_label="AI_REGIONS",
        content_description="AI flagged regions (decision support, not a diagnosis)"[:64],
        graphic_annotations=annotations or None,
        graphic_layers=[layer],
        institution_name=source.get("InstitutionName") or None,
        series_description=SERIES_DESCRIPTIONS[KIND],
    )
    finish_gsps(gsps, source, now)
    return gsps


def finish_gsps(gsps: Dataset, source: Dataset, now: datetime) -> None:
    """Presentation Creation Date/Time (PS3.3 C.11.10) from our clock, not highdicom's, and the
    source's Body Part Examined (General Series: with an unpaired part such as CHEST, Laterality
    (Type 2C) is not required)."""
    gsps.PresentationCreationDate = now.strftime("%Y%m%d")
    gsps.PresentationCreationTime = now.strftime("%H%M%S")
    if source.get("BodyPartExamined"):
        gsps.BodyPartExamined = source.BodyPartExamined
