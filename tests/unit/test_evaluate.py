"""``models evaluate`` on a fixture whose answer is known, and on the shipped model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2e_helpers import PROJECT_ROOT, SHARED_DATA
from onnx_factory import write_tiny_model_dir
from xray_triage.evaluation.evaluate import EvaluationError, evaluate, read_labelled_set
from xray_triage.inference.card import load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.settings import DEFAULT_MODEL_DIR
from xray_triage_server.cli import main

SHARED_CXR = SHARED_DATA / "cxr"
DEFAULT_MODEL = DEFAULT_MODEL_DIR  # the shipped model (package data)

# background level, abnormal, findings, patch (x, y), box (x, y, w, h) or None
FIXTURE = [
    (0.10, 0, "No Finding", (10, 10), None),
    (0.20, 1, "Effusion", (10, 10), None),
    (0.30, 0, "No Finding", (10, 10), None),
    (0.40, 1, "Mass", (10, 10), None),
    (0.50, 1, "Effusion|Mass", (80, 70), (72, 64, 48, 48)),  # box around the patch: a hit
    (0.60, 1, "Effusion", (80, 70), (0, 0, 40, 40)),  # box away from the patch: a miss
]


def _write_fixture(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "finding_labels", "abnormal", "view", "bbox_label", "bbox_x", "bbox_y", "bbox_w", "bbox_h"])
        for n, (level, abnormal, findings, (px, py), box) in enumerate(FIXTURE):
            pixels = np.full((128, 128), level, dtype=np.float32)
            pixels[py : py + 32, px : px + 32] = 1.0
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / "images" / f"img{n}.png")
            box_cols = ["Effusion", *box] if box else ["", "", "", "", ""]
            writer.writerow([f"img{n}.png", findings, abnormal, "PA" if n % 2 else "AP", *box_cols])
    return root


def test_known_answer(tmp_path: Path) -> None:
    data = _write_fixture(tmp_path / "data")
    runner = ModelRunner(load_card(write_tiny_model_dir(tmp_path / "model")))
    result = evaluate(runner, data, n_boot=200, seed=1, show_progress=False)
    # Abnormal score rises with brightness: ranks 1..6, positives at 2, 4, 5, 6 -> 7 of 8 pairs.
    assert result["abnormal_vs_normal"]["auroc"] == 0.875
    low, high = result["abnormal_vs_normal"]["ci95"]
    assert low <= 0.875 <= high
    # Effusion positives are images 1, 4, 5 of 0..5 -> ranks 2, 5, 6 vs 1, 3, 4 -> 7 of 9 pairs.
    assert result["per_label"]["Effusion"]["auroc"] == round(7 / 9, 4)
    assert "Pneumothorax" not in result["per_label"]  # the data set does not label it
    means = [np.mean(np.asarray(Image.open(data / "images" / f"img{n}.png"), dtype=np.float32) / 255) for n in range(6)]
    flagged = [1 / (1 + np.exp(-(4 * m - 2))) >= 0.5 for m in means]
    y = [row[1] for row in FIXTURE]
    expected_sens = sum(f and t for f, t in zip(flagged, y, strict=True)) / sum(y)
    assert result["abnormal_vs_normal"]["sensitivity"] == round(expected_sens, 4)
    # 8 x 8 heatmap cells of 16 px: the hit box holds 4 x 3 cell centres, the miss box 3 x 3.
    chance = round((12 / 64 + 9 / 64) / 2, 4)
    expected_boxes = {"hits": 1, "n": 2, "rate": 0.5, "chance_rate": chance, "by_box_label": {"effusion": {"hits": 1, "n": 2}}}
    assert result["heatmap_peak_in_box"] == expected_boxes
    # The tiny model's heatmaps are the same for every label, so the Abnormal heatmap agrees.
    assert result["abnormal_heatmap_peak_in_box"] == {"heatmap": "label:Abnormal", **expected_boxes}
    assert set(result["per_view"]) == {"AP", "PA"}
    assert result["data"]["n"] == 6 and result["data"]["n_abnormal"] == 4


def test_cli_json_and_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_fixture(tmp_path / "data")
    model = write_tiny_model_dir(tmp_path / "model").parent
    assert main(["models", "evaluate", "--model", str(model), "--data", str(data), "--json", "--bootstrap", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["abnormal_vs_normal"]["auroc"] == 0.875
    (data / "labels.csv").write_text("file,abnormal\nx.png,1\n")
    with pytest.raises(EvaluationError, match="missing columns"):
        read_labelled_set(data)
    assert main(["models", "evaluate", "--model", str(model), "--data", str(tmp_path / "nowhere")]) == 2
    assert "labels.csv" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_CXR.is_dir(), reason="shared/data/cxr not found")
def test_default_model_card_matches_what_evaluate_recomputes() -> None:
    """The shipped card's evaluation numbers must be reproducible by our own command."""
    card = load_card(DEFAULT_MODEL)
    claimed = card.extra["evaluation"]
    assert claimed["model_sha256"] == card.sha256, "the card's evaluation is of another model file"
    result = evaluate(ModelRunner(card), SHARED_CXR, n_boot=100, show_progress=False)
    assert result["data"]["n"] == claimed["n_images"]
    assert result["data"]["labels_csv_sha256"] == claimed["labels_sha256"]
    assert result["abnormal_vs_normal"]["auroc"] == pytest.approx(claimed["abnormal"]["auroc"], abs=1e-3)
    for label, numbers in claimed.get("labels", {}).items():
        assert result["per_label"][label]["auroc"] == pytest.approx(numbers["auroc"], abs=1e-3), label
        # The operating points the card claims are the ones evaluate uses, with the same numbers.
        assert numbers["threshold"] == card.thresholds[label] == result["per_label"][label]["threshold"], label
        for key in ("sensitivity", "specificity"):
            assert result["per_label"][label][key] == pytest.approx(numbers[key], abs=1e-3), (label, key)
    assert result["urgent_share"] == pytest.approx(card.extra["threshold_selection"]["urgent_share_dev"], abs=1e-3)
    for view, numbers in claimed.get("per_view", {}).items():
        assert result["per_view"][view]["auroc"] == pytest.approx(numbers["auroc"], abs=1e-3), view


def _write_box_set(root: Path, boxes_csv: str) -> Path:
    """Three images with a bright patch at (80, 70); boxes come from ``bboxes.csv``."""
    (root / "images").mkdir(parents=True)
    for n in range(3):
        pixels = np.full((128, 128), 0.2 + 0.2 * n, dtype=np.float32)
        pixels[70:102, 80:112] = 1.0
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / "images" / f"b{n}.png")
    (root / "labels.csv").write_text(
        "file,finding_labels,abnormal,bbox_label,bbox_x,bbox_y,bbox_w,bbox_h\n"
        "b0.png,No Finding,0,,,,,\n"
        "b1.png,Effusion,1,Effusion,0,0,30,30\n"  # labels.csv holds only the first box
        "b2.png,Nodule,1,Nodule,72,64,48,48\n"
    )
    (root / "bboxes.csv").write_text(boxes_csv)
    return root


def test_every_box_of_bboxes_csv_and_boxes_of_labels_the_model_lacks(tmp_path: Path) -> None:
    data = _write_box_set(
        tmp_path / "data",
        "file,bbox_label,bbox_x,bbox_y,bbox_w,bbox_h\nb1.png,Effusion,0,0,30,30\nb1.png,Effusion,72,64,48,48\n",
    )
    images = read_labelled_set(data)
    assert [len(i.boxes) for i in images] == [0, 2, 1]
    runner = ModelRunner(load_card(write_tiny_model_dir(tmp_path / "model")))
    result = evaluate(runner, data, n_boot=50, show_progress=False)
    # b1: the second Effusion box (only in bboxes.csv) holds the patch, so the image counts as a hit.
    assert result["heatmap_peak_in_box"]["by_box_label"] == {"effusion": {"hits": 1, "n": 1}}
    # The model has no Nodule label: b2's box is checked only against the Abnormal heatmap.
    assert result["abnormal_heatmap_peak_in_box"]["by_box_label"] == {
        "effusion": {"hits": 1, "n": 1},
        "nodule": {"hits": 1, "n": 1},
    }


@pytest.mark.parametrize(
    ("boxes_csv", "message"),
    [
        ("file,bbox_label,bbox_x,bbox_y,bbox_w,bbox_h\nzz.png,Effusion,1,1,5,5\n", r"bboxes.csv, line 2: 'zz.png' is not in"),
        ("file,bbox_label,bbox_x,bbox_y,bbox_w,bbox_h\nb1.png,Effusion,1,1,0,5\n", r"bboxes.csv, line 2: box .* positive"),
        ("file,bbox_label,bbox_x,bbox_y,bbox_w,bbox_h\nb1.png,Effusion,1,x,5,5\n", r"bboxes.csv, line 2: could not convert"),
        ("file,bbox_x\nb1.png,1\n", r"bboxes.csv: missing columns"),
    ],
)
def test_bad_bboxes_csv_names_file_and_line(tmp_path: Path, boxes_csv: str, message: str) -> None:
    data = _write_box_set(tmp_path / "data", boxes_csv)
    with pytest.raises(EvaluationError, match=message):
        read_labelled_set(data)


SHARED_TRAIN = SHARED_CXR.parent / "cxr-train"


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared/data/cxr-train not found")
def test_train_py_writes_its_validation_split_for_evaluate(tmp_path: Path) -> None:
    """The held-out split train.py chose thresholds on, as a folder `models evaluate` reads (no torch)."""
    import subprocess
    import sys

    out = tmp_path / "valset"
    script = PROJECT_ROOT / "models" / "train.py"
    subprocess.run([sys.executable, str(script), "--write-validation-set", str(out)], check=True, capture_output=True)
    images = read_labelled_set(out)
    card = load_card(DEFAULT_MODEL)
    assert len(images) == card.extra["training"]["n_validation"]
    assert all((out / "images" / i.file).is_file() for i in images)
    validation_patients = {i.file[:8] for i in images}
    with open(SHARED_TRAIN / "labels.csv", newline="") as f:
        all_rows = list(csv.DictReader(f))
    trained_on = {r["file"][:8] for r in all_rows if r["file"][:8] not in validation_patients}
    assert not validation_patients & trained_on
    # Every box of bboxes.csv comes along, and the evaluation reads them all.
    files = {i.file for i in images}
    with open(SHARED_TRAIN / "bboxes.csv", newline="") as f:
        expected = [r for r in csv.DictReader(f) if r["file"] in files]
    with open(out / "bboxes.csv", newline="") as f:
        assert list(csv.DictReader(f)) == expected
    in_extra = {r["file"] for r in expected}
    assert sum(len(i.boxes) for i in images if i.file in in_extra) == len(expected)


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared/data/cxr-train not found")
def test_urgent_operating_points_hold_their_rule_on_the_validation_split(tmp_path: Path) -> None:
    """Issue 16 item 3: the urgent labels' thresholds meet the card's target specificity on TRAIN's
    validation split, with the sensitivity/specificity the card states; the sample studies are
    mostly not urgent any more (6 of 8 were at the Youden thresholds)."""
    import subprocess
    import sys

    from xray_triage.triage.analyze import analyze_file

    out = tmp_path / "valset"
    script = PROJECT_ROOT / "models" / "train.py"
    subprocess.run([sys.executable, str(script), "--write-validation-set", str(out)], check=True, capture_output=True)
    card = load_card(DEFAULT_MODEL)
    runner = ModelRunner(card)
    result = evaluate(runner, out, n_boot=10, show_progress=False)
    selection = card.extra["threshold_selection"]
    assert card.triage.urgent_labels
    for label in card.triage.urgent_labels:
        chosen = selection[label]
        target = float(chosen["rule"].removeprefix("specificity >= "))
        assert target >= 0.9 and chosen["threshold"] == card.thresholds[label]
        measured = result["per_label"][label]
        assert measured["specificity"] >= target, label
        assert measured["specificity"] == pytest.approx(chosen["specificity"], abs=1e-3), label
        assert measured["sensitivity"] == pytest.approx(chosen["sensitivity"], abs=1e-3), label
        assert measured["urgent"] and measured["operating_point"] == chosen["rule"]
    assert result["urgent_share"] == pytest.approx(selection["urgent_share_validation"], abs=1e-3)
    samples = sorted((SHARED_DATA / "dicom").glob("dev_*.dcm"))
    urgent = [f.name for f in samples if analyze_file(f, runner).score.priority == "urgent"]
    assert len(samples) == 8 and len(urgent) <= 2, urgent


def test_specificity_threshold_is_the_lowest_meeting_the_target() -> None:
    from xray_triage.evaluation.metrics import sens_spec, specificity_threshold

    y = np.array([0] * 10 + [1] * 3)
    s = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.50, 0.30, 0.60, 0.085])
    t = specificity_threshold(y, s, 0.9)
    assert sens_spec(y, s, t) == (2 / 3, 0.9)  # 0.50 is the one negative flagged; 0.085 is missed
    assert 0.3 > t > 0.09
    assert specificity_threshold(y, s, 1.0) > 0.5
    with pytest.raises(ValueError):
        specificity_threshold(np.ones(3), np.zeros(3), 0.9)
