"""The AI result of one image as a Comprehensive SR: a TID 1500 Measurement Report (IHE AIR).

Observer: the model as a device (TID 1004): name and version, the card's manufacturer, the
card's sha256 as the serial number and, hashed under the UID root, the device UID. One
measurement group per flagged label (TID 1410 with the heatmap's hot region as a SCOORD
polyline on the source image, TID 1501 when the result has no heatmap): finding type = the
label's code, measurements = probability and threshold (no units, 0..1), algorithm = the model.
Then the study's priority (a qualitative evaluation of the report). Patient and study come from
the source image (highdicom copies them from the evidence), so PACS files it in the same study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from xray_triage.inference.card import ModelCard
from xray_triage.results import codes
from xray_triage.results.common import SERIES_DESCRIPTIONS, SERIES_NUMBERS, SOFTWARE, make_uid, series_uid
from xray_triage.results.regions import hot_box, outline

KIND = "ai-sr"


@dataclass(frozen=True)
class AiResult:
    """What the SR says: one image's stored triage result (``TriageResult``) and its study's priority."""

    flagged: Sequence[str]
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float]
    heatmaps: Mapping[str, Any]  # label -> {"grid", "box": [top, left, height, width]}
    image_priority: str
    study_priority: str | None


def device_uid(card: ModelCard, uid_root: str) -> str:
    """The model's Device Observer UID: derived from the card's sha256 under the UID root."""
    return make_uid(uid_root, "device", card.sha256)


def observer_context(card: ModelCard, uid_root: str) -> ObservationContext:
    """TID 1002: the model as the device observer."""
    device = DeviceObserverIdentifyingAttributes(
        uid=device_uid(card, uid_root),
        name=card.name[:64],
        manufacturer_name=(card.manufacturer or SOFTWARE)[:64],
        model_name=card.model_version[:64],
        serial_number=card.sha256,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=dcm_codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def build_ai_sr(
    source: Dataset,
    result: AiResult,
    card: ModelCard,
    *,
    uid_root: str,
    version: int,
    content_sha256: str,
    now: datetime,
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of ``result`` on the image ``source`` (its header; pixels not needed).

    ``version`` is its Instance Number; ``content_sha256`` (of the inputs) picks its SOP
    Instance UID, so the same input always names the same object. ``now`` is the content
    date/time. Raises ``ValueError`` (from highdicom) for a source image without the UIDs and
    patient module an SR's evidence needs.
    """
    algorithm = AlgorithmIdentification(name=card.name[:64], version=card.version[:64])
    groups = []
    for label in result.flagged:
        concept = codes.label_concept(card, label)
        tracking = TrackingIdentifier(
            uid=make_uid(uid_root, "tracking", str(source.SOPInstanceUID), label, content_sha256),
            identifier=f"AI finding {label}"[:64],
        )
        measurements = [
            Measurement(
                name=codes.PROBABILITY,
                value=round(float(result.probabilities.get(label, 0.0)), 6),
                unit=codes.NO_UNITS,
                algorithm_id=algorithm,
            ),
            Measurement(
                name=codes.THRESHOLD,
                value=round(float(result.thresholds.get(label, 0.0)), 6),
                unit=codes.NO_UNITS,
                algorithm_id=algorithm,
            ),
        ]
        box = hot_box(result.heatmaps.get(label))
        if box is not None:
            region = ImageRegion(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=outline(box),
                source_image=SourceImageForRegion.from_source_image(source),
            )
            groups.append(
                PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=region,
                    finding_type=concept,
                    algorithm_id=algorithm,
                    measurements=measurements,
                )
            )
        else:
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=concept,
                    algorithm_id=algorithm,
                    measurements=measurements,
                    source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
                )
            )
    report = MeasurementReport(
        observation_context=observer_context(card, uid_root),
        procedure_reported=codes.CHEST_XRAY,
        imaging_measurements=groups or None,
        referenced_images=None if groups else [source],
    )
    root = report[0]
    priority = result.study_priority or result.image_priority
    if priority in codes.PRIORITIES:
        evaluations = ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
        )
        evaluations.ContentSequence = [
            CodeContentItem(
                name=codes.TRIAGE_PRIORITY,
                value=codes.PRIORITIES[priority],
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        ]
        root.ContentSequence.append(evaluations)
    study_uid = str(source.StudyInstanceUID)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_uid(uid_root, study_uid, KIND),
        series_number=SERIES_NUMBERS[KIND],
        sop_instance_uid=make_uid(uid_root, KIND, str(source.SOPInstanceUID), content_sha256),
        instance_number=version,
        manufacturer=SOFTWARE,
        is_complete=True,
        institution_name=source.get("InstitutionName") or None,
        content_date=now.date(),
        content_time=now.time(),
        series_description=SERIES_DESCRIPTIONS[KIND],
    )
    return sr
