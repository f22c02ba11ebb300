"""Model cards, the runner and the triage rules, on tiny models built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx_factory import write_tiny_model_dir
from xray_triage.inference.card import ModelCardError, load_card
from xray_triage.inference.runner import ModelRunner, choose_providers
from xray_triage.pipeline.pixels import DisplayImage
from xray_triage.triage.analyze import analyze_display
from xray_triage.triage.scoring import score


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    write_tiny_model_dir(tmp_path / "m")
    return tmp_path / "m"


def test_good_card_loads_and_runs(model_dir: Path) -> None:
    card = load_card(model_dir)
    assert card.labels == ("Abnormal", "Effusion", "Pneumothorax")
    assert card.model_version == "tiny-test@0.0.1"
    runner = ModelRunner(card)
    out = runner.run(np.full((2, 1, 64, 64), 0.5, dtype=np.float32))
    assert out.probabilities.shape == (2, 3)
    assert out.heatmaps is not None and out.heatmaps.shape == (2, 3, 8, 8)
    # p_k = sigmoid(w_k * mean - 2) with w = 4, 5, 6 and mean 0.5
    expected = 1 / (1 + np.exp(-(np.array([4.0, 5.0, 6.0]) * 0.5 - 2.0)))
    assert np.allclose(out.probabilities[0], expected, atol=1e-6)


def test_tampered_model_is_refused_naming_sha256(model_dir: Path) -> None:
    onnx_file = model_dir / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="sha256"):
        load_card(model_dir)


def test_missing_model_file_is_a_clear_error(model_dir: Path) -> None:
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelCardError, match="missing"):
        load_card(model_dir)


def test_missing_card_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="no model card"):
        load_card(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('labels = ["Abnormal", "Effusion", "Pneumothorax"]', "labels = []"), "labels"),
        (lambda t: t.replace('"Effusion" = 0.5', '"Nodule" = 0.5'), "Nodule"),
        (lambda t: t.replace('urgent_labels = ["Pneumothorax"]', 'urgent_labels = ["Fracture"]'), "Fracture"),
        (lambda t: t.replace('abnormal_score = "label:Abnormal"', 'abnormal_score = "mean"'), "abnormal_score"),
        (lambda t: t.replace('resize = "squash"', 'resize = "letterbox"'), "resize"),
        (lambda t: t.replace("[input]", "[inputs]"), r"\[input\]"),
        (lambda t: t.replace("height = 64", 'height = "tall"'), "height"),
        (lambda t: t + "\n[broken", "cannot read"),
        (lambda t: t + '\n[codes.Nodule]\nscheme = "SCT"\nvalue = "1"\nmeaning = "x"\n', r"\[codes\].*Nodule"),
        (lambda t: t + '\n[codes.Effusion]\nscheme = "SCT"\nvalue = ""\nmeaning = "x"\n', "scheme, value and meaning"),
    ],
)
def test_bad_cards_name_the_problem(model_dir: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    card = model_dir / "model.toml"
    card.write_text(edit(card.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ModelCardError, match=message):
        load_card(model_dir)


def test_card_with_more_labels_than_outputs_is_refused_at_load(model_dir: Path) -> None:
    card = model_dir / "model.toml"
    text = card.read_text(encoding="utf-8").replace(
        'labels = ["Abnormal", "Effusion", "Pneumothorax"]', 'labels = ["Abnormal", "Effusion", "Pneumothorax", "Mass"]'
    )
    card.write_text(text, encoding="utf-8")
    with pytest.raises(ModelCardError, match="4 labels"):
        ModelRunner(load_card(model_dir))


def test_card_naming_an_absent_output_is_refused(model_dir: Path) -> None:
    card = model_dir / "model.toml"
    card.write_text(card.read_text(encoding="utf-8").replace('heatmaps = "heatmaps"', 'heatmaps = "cams"'), encoding="utf-8")
    with pytest.raises(ModelCardError, match="cams"):
        ModelRunner(load_card(model_dir))


def test_priority_rules_follow_the_card(tmp_path: Path) -> None:
    card = load_card(
        write_tiny_model_dir(tmp_path / "m", thresholds={"Abnormal": 0.6, "Effusion": 0.7, "Pneumothorax": 0.9})
    )
    normal = score(np.array([0.2, 0.1, 0.1]), card)
    assert (normal.priority, normal.flagged, normal.abnormal_score) == ("normal", [], 0.2)
    abnormal = score(np.array([0.65, 0.75, 0.3]), card)
    assert abnormal.priority == "abnormal" and abnormal.flagged == ["Effusion", "Abnormal"]
    urgent = score(np.array([0.3, 0.1, 0.95]), card)
    assert urgent.priority == "urgent" and urgent.flagged == ["Pneumothorax"]
    at_threshold = score(np.array([0.6, 0.0, 0.0]), card)
    assert at_threshold.flagged == ["Abnormal"]


def test_analysis_records_stage_timings_and_model_version(model_dir: Path) -> None:
    runner = ModelRunner(load_card(model_dir))
    image = DisplayImage(pixels=np.ones((300, 200), dtype=np.float32), source_shape=(300, 200), window="minmax")
    analysis = analyze_display(image, runner, decode_ms=1.5)
    assert set(analysis.timings_ms) == {"decode", "preprocess", "inference"}
    assert analysis.model_version == "tiny-test@0.0.1"
    # mean 1.0 -> p = sigmoid(4 - 2) for Abnormal
    assert analysis.score.abnormal_score == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-5)


def test_unavailable_provider_falls_back_to_cpu() -> None:
    assert choose_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(None)[-1] == "CPUExecutionProvider"
