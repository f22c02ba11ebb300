"""The DICOM result objects (xray_triage/results/), written to files and read by the real tools."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_validators import dciodvfy, dsrdump
from pydicom.sr.codedict import codes as dcm_codes

from e2e_helpers import SHARED_DICOM
from xray_triage.inference.card import load_card
from xray_triage.results import codes
from xray_triage.results.ai_gsps import build_ai_gsps
from xray_triage.results.ai_sr import AiResult, build_ai_sr, device_uid
from xray_triage.results.annotation_gsps import Mark, build_annotation_gsps
from xray_triage.results.common import encode, read_source
from xray_triage.results.consult_sr import ConsultContent, ThreadEntry, build_consult_sr
from xray_triage.settings import DEFAULT_MODEL_DIR

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
ROOT = "1.2.826.0.1.3680043.10.999"
SOURCE_NAME = "dev_01_dx_pa_explicit_window.dcm"


@pytest.fixture(scope="module")
def source(shared_dicom: Path) -> pydicom.Dataset:
    return pydicom.dcmread(shared_dicom / SOURCE_NAME, stop_before_pixels=True)


@pytest.fixture(scope="module")
def card():  # type: ignore[no-untyped-def]
    return load_card(DEFAULT_MODEL_DIR)


def _hot_grid() -> list[list[float]]:
    grid = [[0.0] * 8 for _ in range(8)]
    grid[2][5] = 1.0
    grid[3][5] = 0.7
    return grid


def _result(source: pydicom.Dataset, card) -> AiResult:  # type: ignore[no-untyped-def]
    box = [0, 0, int(source.Rows), int(source.Columns)]
    return AiResult(
        flagged=["Abnormal", "Effusion"],
        probabilities={"Abnormal": 0.91, "Effusion": 0.42, "Edema": 0.05},
        thresholds=dict(card.thresholds),
        heatmaps={"Effusion": {"grid": _hot_grid(), "box": box}},
        image_priority="urgent",
        study_priority="urgent",
    )


def _write(tmp_path: Path, name: str, dataset: pydicom.Dataset) -> Path:
    path = tmp_path / name
    path.write_bytes(encode(dataset))
    return path


def _same_identity(written: pydicom.Dataset, source: pydicom.Dataset) -> None:
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert written.get(keyword) == source.get(keyword), keyword
    assert written.SOPInstanceUID.startswith(ROOT + ".")
    assert written.SeriesInstanceUID.startswith(ROOT + ".")
    assert written.SeriesInstanceUID != source.SeriesInstanceUID


def test_ai_sr_is_a_valid_tid1500_report_with_coded_findings(tmp_path: Path, source, card) -> None:  # type: ignore[no-untyped-def]
    sr = build_ai_sr(
        source, _result(source, card), card, uid_root=ROOT, version=1, content_sha256="a" * 64, now=NOW
    )
    path = _write(tmp_path, "ai-sr.dcm", sr)
    assert dciodvfy(path) == []
    text = dsrdump(path)
    written = pydicom.dcmread(path)
    assert written.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    _same_identity(written, source)
    # Observer device: the model, its version, manufacturer, the card's sha256.
    assert 'Device Observer Name")="xray-triage-demo"' in text
    assert "xray-triage-demo@0.1.0" in text
    assert device_uid(card, ROOT) in text and device_uid(card, ROOT).startswith(ROOT)
    serial = [i for i in written.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == dcm_codes.DCM.DeviceObserverSerialNumber.value]
    assert serial and serial[0].TextValue == card.sha256
    # One finding per flagged label, coded from the card (SNOMED CT) or privately when it has no code.
    assert "(60046008,SCT,\"Pleural effusion\")" in text
    assert f"(ABNORMAL,{codes.PRIVATE_SCHEME},\"Abnormal\")" in text
    assert "Pulmonary edema" not in text  # not flagged
    assert '"AI model probability")="0.91"' in text and '"AI model probability")="0.42"' in text
    assert f'"AI model decision threshold")="{card.thresholds["Effusion"]:g}"' in text
    # The heatmap's hot region on the source image, and the study priority.
    assert "SCOORD" in text and "POLYLINE" in text
    assert source.SOPInstanceUID in str(written.CurrentRequestedProcedureEvidenceSequence)
    assert '"AI triage priority")=(URGENT' in text


def test_ai_gsps_outlines_the_hot_region_on_its_own_layer(tmp_path: Path, source, card) -> None:  # type: ignore[no-untyped-def]
    result = _result(source, card)
    gsps = build_ai_gsps(
        source, result.flagged, result.probabilities, result.heatmaps, card,
        uid_root=ROOT, version=1, content_sha256="a" * 64, now=NOW,
    )  # fmt: skip
    path = _write(tmp_path, "ai-gsps.dcm", gsps)
    assert dciodvfy(path) == []
    written = pydicom.dcmread(path)
    assert written.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    _same_identity(written, source)
    assert [layer.GraphicLayer for layer in written.GraphicLayerSequence] == ["AI"]
    annotation = written.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (outline,) = annotation.GraphicObjectSequence
    assert outline.GraphicAnnotationUnits == "PIXEL" and outline.GraphicType == "POLYLINE"
    # Cells (2..3, 5) of an 8x8 grid over the whole image: columns 5/8..6/8, rows 2/8..4/8 of it.
    xs, ys = outline.GraphicData[0::2], outline.GraphicData[1::2]
    assert min(xs) == pytest.approx(int(source.Columns) * 5 / 8, abs=0.01)
    assert max(xs) == pytest.approx(int(source.Columns) * 6 / 8, abs=0.01)
    assert min(ys) == pytest.approx(int(source.Rows) * 2 / 8, abs=0.01)
    assert max(ys) == pytest.approx(int(source.Rows) * 4 / 8, abs=0.01)
    assert sorted(t.UnformattedTextValue for t in annotation.TextObjectSequence) == ["Abnormal 0.91", "Effusion 0.42"]
    assert written.PresentationCreationDate == "20260304"


def test_annotation_gsps_keeps_marks_in_source_pixels_with_author(tmp_path: Path, source) -> None:  # type: ignore[no-untyped-def]
    marks = [
        Mark(1, "rect", {"x": 10, "y": 20, "w": 100, "h": 50}, "opacity", "Dr. Nguyễn Lan", NOW),
        Mark(2, "ellipse", {"cx": 300, "cy": 310, "rx": 40, "ry": 60}, "", "Dr. Nguyễn Lan", NOW),
        Mark(3, "arrow", {"x1": 1, "y1": 2, "x2": 50, "y2": 60}, "", "Dr. Nguyễn Lan", NOW),
        Mark(4, "freehand", {"points": [[1, 1], [5, 5], [9, 2]]}, "", "Dr. Nguyễn Lan", NOW),
        Mark(5, "text", {"x": 100, "y": 100}, "Tràn dịch màng phổi", "Dr. Nguyễn Lan", NOW),
        Mark(6, "arrow", {"x1": 5, "y1": 6, "x2": 7, "y2": 8}, "", "Dr. Trần Bình", NOW.replace(hour=9)),
    ]
    gsps = build_annotation_gsps(source, marks, uid_root=ROOT, version=2, content_sha256="b" * 64, now=NOW)
    path = _write(tmp_path, "marks.dcm", gsps)
    assert dciodvfy(path) == []
    written = pydicom.dcmread(path)
    _same_identity(written, source)
    assert written.InstanceNumber == 2
    assert [(layer.GraphicLayer, layer.GraphicLayerDescription) for layer in written.GraphicLayerSequence] == [
        ("MARKS", "Marks by Dr. Nguyễn Lan, 2026-03-04 05:06"),
        ("MARKS2", "Marks by Dr. Trần Bình, 2026-03-04 09:06"),
    ]
    assert [a.GraphicLayer for a in written.GraphicAnnotationSequence] == ["MARKS", "MARKS2"]
    assert str(written.ContentCreatorName) == "Dr. Trần Bình^"  # the newest mark's author
    objects = written.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert [o.GraphicType for o in objects] == ["POLYLINE", "ELLIPSE", "POLYLINE", "POLYLINE"]
    assert list(objects[0].GraphicData) == [10, 20, 110, 20, 110, 70, 10, 70, 10, 20]
    assert list(objects[1].GraphicData) == [300, 250, 300, 370, 260, 310, 340, 310]  # major (vertical) axis first
    texts = [t.UnformattedTextValue for t in written.GraphicAnnotationSequence[0].TextObjectSequence]
    assert texts == ["opacity", "Tràn dịch màng phổi"]


def test_consult_sr_new_version_references_its_predecessor(tmp_path: Path, source) -> None:  # type: ignore[no-untyped-def]
    content = ConsultContent(
        consult_id=7,
        question=ThreadEntry("Trạm Y tế Thạnh An", "Viêm phổi?", NOW),
        conclusion="refer_hospital",
        specialist="Dr. Lan",
        messages=[ThreadEntry("Dr. Lan", "Likely pleural effusion; refer.", NOW)],
    )
    first = build_consult_sr(source, content, uid_root=ROOT, version=1, content_sha256="c" * 64, now=NOW)
    second = build_consult_sr(
        source, content, uid_root=ROOT, version=2, content_sha256="d" * 64, now=NOW, previous=[first]
    )
    path = _write(tmp_path, "consult.dcm", second)
    assert dciodvfy(path) == []
    text = dsrdump(path)
    written = pydicom.dcmread(path)
    assert written.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    _same_identity(written, source)
    assert written.SOPInstanceUID != first.SOPInstanceUID
    predecessor = written.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "(REFERHOSP,99XRAYTRIAGE,\"Refer to hospital\")" in text
    assert "Likely pleural effusion; refer." in text and "Viêm phổi?" in text
    assert '"Person Observer Name")="Dr. Lan^"' in text


def test_uid_root_default_is_pydicoms_and_uids_are_stable(source, card) -> None:  # type: ignore[no-untyped-def]
    result = _result(source, card)
    one = build_ai_sr(source, result, card, uid_root="", version=1, content_sha256="e" * 64, now=NOW)
    again = build_ai_sr(source, result, card, uid_root="", version=1, content_sha256="e" * 64, now=NOW)
    other = build_ai_sr(source, result, card, uid_root="", version=2, content_sha256="f" * 64, now=NOW)
    assert one.SOPInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")
    assert one.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert one.SeriesInstanceUID == other.SeriesInstanceUID


def test_shipped_card_codes_its_findings_and_lists_the_rest(card) -> None:  # type: ignore[no-untyped-def]
    assert card.codes["Effusion"].value == "60046008" and card.codes["Effusion"].scheme == "SCT"
    assert card.uncoded_labels == ("Abnormal",)
    assert card.manufacturer


def test_results_consumer_follows_results_enabled(tmp_path: Path, card) -> None:  # type: ignore[no-untyped-def]
    from xray_triage.settings import Settings
    from xray_triage.store.db import open_database
    from xray_triage_server.serve import results_consumer

    settings = Settings(data_dir=tmp_path / "data", uid_root=ROOT)
    db = open_database(settings)
    try:
        consumer = results_consumer(settings, db, card)
        assert consumer is not None and consumer.name == "results"
        assert consumer.batch == 1  # one event per write transaction (serve.results_consumer says why)
        assert results_consumer(settings.model_copy(update={"results_enabled": False}), db, card) is None
    finally:
        db.dispose()


SHARED_FILES = sorted(SHARED_DICOM.glob("*.dcm")) + sorted((SHARED_DICOM.parent / "dicom-realworld").glob("*.dcm"))


@pytest.mark.parametrize("path", SHARED_FILES, ids=lambda p: p.name)
def test_ai_objects_of_every_shared_image_are_valid(tmp_path: Path, path: Path, card) -> None:  # type: ignore[no-untyped-def]
    """Real headers: decimal commas, LUT data read as numbers, a 12-bit table declared 16 bits
    (stretched, so it is valid and looks as the viewer shows it), an RGB secondary capture (a
    Color Softcopy Presentation State with sRGB), a file without preamble or meta group."""
    source = read_source(path.parent, path.name)
    result = _result(source, card)
    sr = build_ai_sr(source, result, card, uid_root=ROOT, version=1, content_sha256="a" * 64, now=NOW)
    gsps = build_ai_gsps(
        source, result.flagged, result.probabilities, result.heatmaps, card,
        uid_root=ROOT, version=1, content_sha256="a" * 64, now=NOW,
    )  # fmt: skip
    for name, dataset in (("sr.dcm", sr), ("ps.dcm", gsps)):
        written_path = _write(tmp_path, name, dataset)
        assert dciodvfy(written_path) == []
        written = pydicom.dcmread(written_path)
        assert str(written.PatientName) == str(source.get("PatientName", ""))
        assert written.StudyInstanceUID == source.StudyInstanceUID
    colour = int(source.get("SamplesPerPixel", 1)) == 3
    assert gsps.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.11.2" if colour else "1.2.840.10008.5.1.4.1.1.11.1")
    for transformation in gsps.get("SoftcopyVOILUTSequence", []):
        for lut in transformation.get("VOILUTSequence", []):
            data = np.frombuffer(lut.LUTData, dtype="<u2" if lut.LUTDescriptor[2] == 16 else np.uint8)
            assert int(data.max()).bit_length() == lut.LUTDescriptor[2]  # the table uses its declared range
