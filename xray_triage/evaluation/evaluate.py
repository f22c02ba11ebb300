"""``xray-triage models evaluate``: how a model does on a labelled image set.

The data directory holds images (PNG, JPEG or DICOM) and a ``labels.csv`` in the
layout of the NIH sets under ``shared/data`` (columns ``file``,
``finding_labels`` (pipe-separated, or ``No Finding``), ``abnormal`` (0/1), and
optionally ``view``, ``bbox_label``, ``bbox_x``, ``bbox_y``, ``bbox_w``,
``bbox_h``). Every image goes through the same pipeline as in the server, so the
numbers describe what the server would do.

Reported: abnormal-vs-normal AUROC of the card's ``abnormal_score`` with a
bootstrap 95% CI, per view; per-label AUROC with CI for each model label that
names a finding of the data set; sensitivity and specificity at the card's
thresholds; and, where lesion boxes exist, how often the heatmap peak of the
boxed label falls inside the box.
"""

from __future__ import annotations

import csv
import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xray_triage.evaluation.metrics import auroc, bootstrap_ci, sens_spec
from xray_triage.inference.card import ModelCard
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import read_any_display
from xray_triage.pipeline.preprocess import to_model_input
from xray_triage.triage.heatmaps import heatmap_records, peak_in_source
from xray_triage.triage.scoring import score

# NIH's box file says "Infiltrate" where its label file says "Infiltration".
BOX_LABEL_ALIASES = {"infiltrate": "infiltration"}
REQUIRED_COLUMNS = ("file", "finding_labels", "abnormal")


class EvaluationError(ValueError):
    """The data set cannot be evaluated; the message names the file and what to fix."""


@dataclass(frozen=True)
class LabelledImage:
    file: str
    findings: frozenset[str]  # normalised finding names
    abnormal: int
    view: str
    box_label: str  # normalised, "" when no box
    box: tuple[float, float, float, float] | None  # x, y, w, h in image pixels


def normalise_label(name: str) -> str:
    key = name.strip().lower().replace("_", " ")
    return BOX_LABEL_ALIASES.get(key, key)


def read_labelled_set(data_dir: Path) -> list[LabelledImage]:
    """Parse ``labels.csv``; raise with the row number for malformed rows."""
    labels_csv = data_dir / "labels.csv"
    if not labels_csv.is_file():
        raise EvaluationError(f"{labels_csv}: not found; the data directory needs a labels.csv")
    rows: list[LabelledImage] = []
    with open(labels_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationError(f"{labels_csv}: missing columns {missing}")
        for line, row in enumerate(reader, start=2):
            try:
                abnormal = int(row["abnormal"])
                box = None
                if (row.get("bbox_label") or "").strip():
                    box = tuple(float(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"{labels_csv}, line {line}: {exc}") from exc
            if abnormal not in (0, 1):
                raise EvaluationError(f"{labels_csv}, line {line}: abnormal must be 0 or 1")
            findings = frozenset(
                normalise_label(x) for x in row["finding_labels"].split("|") if x.strip() and x != "No Finding"
            )
            rows.append(
                LabelledImage(
                    file=row["file"],
                    findings=findings,
                    abnormal=abnormal,
                    view=(row.get("view") or "").strip().upper(),
                    box_label=normalise_label(row.get("bbox_label") or "") if box else "",
                    box=box,  # type: ignore[arg-type]
                )
            )
    if not rows:
        raise EvaluationError(f"{labels_csv}: no rows")
    return rows


@dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (n, labels)
    abnormal_scores: np.ndarray  # (n,)
    box_hits: list[bool]  # one per image with a box whose label the model has


def predict_set(
    runner: ModelRunner, data_dir: Path, images: list[LabelledImage], progress: Callable[[int, int], None]
) -> Predictions:
    card = runner.card
    model_labels = {normalise_label(label): label for label in card.labels}
    probabilities, abnormal_scores, hits = [], [], []
    for n, image in enumerate(images, start=1):
        path = data_dir / "images" / image.file
        if not path.exists():
            path = data_dir / image.file
        display = read_any_display(path)
        out = runner.run(to_model_input(display.pixels, card.input)[None])
        probs = out.probabilities[0]
        probabilities.append(probs)
        abnormal_scores.append(score(probs, card).abnormal_score)
        label = model_labels.get(image.box_label)
        if image.box is not None and label is not None and out.heatmaps is not None:
            record = heatmap_records(out.heatmaps[0], card.labels, [label], display.source_shape, card.input)[label]
            row, col = peak_in_source(record)
            x, y, w, h = image.box
            hits.append(x <= col <= x + w and y <= row <= y + h)
        progress(n, len(images))
    return Predictions(np.asarray(probabilities), np.asarray(abnormal_scores), hits)


def _ci(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    ci = bootstrap_ci(y, s, n_resamples=n_boot, seed=seed)
    return {
        "auroc": _round(ci.estimate),
        "ci95": [_round(ci.low), _round(ci.high)],
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
    }


def _round(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def summarise(
    card: ModelCard, images: list[LabelledImage], preds: Predictions, *, n_boot: int, seed: int
) -> dict[str, Any]:
    y_abnormal = np.array([i.abnormal for i in images])
    threshold = card.triage.abnormal_threshold
    sens, spec = sens_spec(y_abnormal, preds.abnormal_scores, threshold)
    result: dict[str, Any] = {
        "model": card.model_version,
        "abnormal_vs_normal": {
            **_ci(y_abnormal, preds.abnormal_scores, n_boot, seed),
            "score": card.triage.abnormal_score,
            "threshold": threshold,
            "sensitivity": _round(sens),
            "specificity": _round(spec),
        },
        "per_view": {},
        "per_label": {},
    }
    for view in sorted({i.view for i in images if i.view}):
        mask = np.array([i.view == view for i in images])
        result["per_view"][view] = {
            "auroc": _round(auroc(y_abnormal[mask], preds.abnormal_scores[mask])),
            "n": int(mask.sum()),
        }
    for k, label in enumerate(card.labels):
        key = normalise_label(label)
        if key == "abnormal":
            y = y_abnormal
        elif any(key in i.findings for i in images):
            y = np.array([int(key in i.findings) for i in images])
        else:
            continue  # the data set does not label this finding
        s = preds.probabilities[:, k]
        sens, spec = sens_spec(y, s, card.thresholds[label])
        result["per_label"][label] = {
            **_ci(y, s, n_boot, seed),
            "threshold": card.thresholds[label],
            "sensitivity": _round(sens),
            "specificity": _round(spec),
        }
    if preds.box_hits:
        result["heatmap_peak_in_box"] = {
            "hits": int(sum(preds.box_hits)),
            "n": len(preds.box_hits),
            "rate": _round(sum(preds.box_hits) / len(preds.box_hits)),
        }
    return result


def evaluate(
    runner: ModelRunner, data_dir: Path, *, n_boot: int = 1000, seed: int = 0, show_progress: bool = True
) -> dict[str, Any]:
    data_dir = Path(data_dir)
    images = read_labelled_set(data_dir)

    def progress(done: int, total: int) -> None:
        if show_progress and (done % 20 == 0 or done == total):
            print(f"  evaluated {done}/{total} images", file=sys.stderr, flush=True)

    preds = predict_set(runner, data_dir, images, progress)
    result = summarise(runner.card, images, preds, n_boot=n_boot, seed=seed)
    labels_csv = data_dir / "labels.csv"
    result["data"] = {
        "dir": str(data_dir),
        "n": len(images),
        "n_abnormal": int(sum(i.abnormal for i in images)),
        "labels_csv_sha256": hashlib.sha256(labels_csv.read_bytes()).hexdigest(),
        "bootstrap_resamples": n_boot,
        "seed": seed,
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """Plain-text report for the console."""

    def fmt(v: float | None) -> str:
        return "  n/a" if v is None else f"{v:.3f}"

    a = result["abnormal_vs_normal"]
    lines = [
        f"Model {result['model']} on {result['data']['dir']} (n={result['data']['n']}, "
        f"abnormal {result['data']['n_abnormal']})",
        f"Abnormal vs normal ({a['score']}): AUROC {fmt(a['auroc'])} "
        f"[95% CI {fmt(a['ci95'][0])}-{fmt(a['ci95'][1])}]; at threshold {a['threshold']:.3f}: "
        f"sensitivity {fmt(a['sensitivity'])}, specificity {fmt(a['specificity'])}",
    ]
    if result["per_view"]:
        views = ", ".join(f"{v} {fmt(d['auroc'])} (n={d['n']})" for v, d in result["per_view"].items())
        lines.append(f"AUROC per view: {views}")
    lines.append("")
    lines.append(f"{'label':<20} {'n+':>4} {'AUROC':>6} {'95% CI':>13} {'thresh':>7} {'sens':>6} {'spec':>6}")
    for label, d in result["per_label"].items():
        ci = f"{fmt(d['ci95'][0])}-{fmt(d['ci95'][1])}"
        lines.append(
            f"{label:<20} {d['n_positive']:>4} {fmt(d['auroc']):>6} {ci:>13} {d['threshold']:>7.3f} "
            f"{fmt(d['sensitivity']):>6} {fmt(d['specificity']):>6}"
        )
    if "heatmap_peak_in_box" in result:
        h = result["heatmap_peak_in_box"]
        lines.append(f"\nHeatmap peak inside the lesion box: {h['hits']}/{h['n']}")
    return "\n".join(lines)
