"""``xray-triage models evaluate``: how a model does on a labelled image set.

The data directory holds images (PNG, JPEG or DICOM) and a ``labels.csv`` in the
layout of the NIH sets under ``shared/data`` (columns ``file``,
``finding_labels`` (pipe-separated, or ``No Finding``), ``abnormal`` (0/1), and
optionally ``view``, ``bbox_label``, ``bbox_x``, ``bbox_y``, ``bbox_w``,
``bbox_h``); an optional ``bboxes.csv`` (``file``, ``bbox_label``, ``bbox_x``,
``bbox_y``, ``bbox_w``, ``bbox_h``) lists every box of images with more than one,
as in ``shared/data/cxr-train``. Every image goes through the same pipeline as in
the server, so the numbers describe what the server would do.

Reported: abnormal-vs-normal AUROC of the card's ``abnormal_score`` with a
bootstrap 95% CI, per view; per-label AUROC with CI for each model label that
names a finding of the data set; sensitivity and specificity at the card's
thresholds; and, where lesion boxes exist, how often the heatmap peak of the
boxed label falls inside the box. Two box checks are made, each beside its chance
rate (the share of heatmap cells whose centre lies in the box, i.e. what a peak
placed at random would score, so a small n can be read):

- the boxed label's own heatmap, for boxes whose label the model has;
- the heatmap behind the abnormal score (the card's ``label:NAME``, or the
  highest-probability label for ``max``), for every box: it shows whether the
  model looks at the lesion even when it has no label for that finding.
"""

from __future__ import annotations

import csv
import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from xray_triage.evaluation.metrics import auroc, bootstrap_ci, sens_spec
from xray_triage.inference.card import ModelCard
from xray_triage.inference.runner import ModelRunner
from xray_triage.pipeline.pixels import read_any_display
from xray_triage.pipeline.preprocess import decode_min_side, to_model_input
from xray_triage.triage.heatmaps import cell_centre, heatmap_records, peak_in_source
from xray_triage.triage.scoring import score

# NIH's box file says "Infiltrate" where its label file says "Infiltration".
BOX_LABEL_ALIASES = {"infiltrate": "infiltration"}
REQUIRED_COLUMNS = ("file", "finding_labels", "abnormal")
BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")


class EvaluationError(ValueError):
    """The data set cannot be evaluated; the message names the file and what to fix."""


@dataclass(frozen=True)
class LesionBox:
    """A lesion box in source-image pixels (x, y = top-left corner)."""

    label: str  # normalised finding name
    x: float
    y: float
    w: float
    h: float

    def contains(self, row: float, col: float) -> bool:
        return self.x <= col <= self.x + self.w and self.y <= row <= self.y + self.h


@dataclass(frozen=True)
class LabelledImage:
    file: str
    findings: frozenset[str]  # normalised finding names
    abnormal: int
    view: str
    boxes: tuple[LesionBox, ...] = ()


def normalise_label(name: str) -> str:
    key = name.strip().lower().replace("_", " ")
    return BOX_LABEL_ALIASES.get(key, key)


def _read_box(row: dict[str, str]) -> LesionBox | None:
    """The row's box, or None when ``bbox_label`` is empty; ValueError when malformed."""
    label = (row.get("bbox_label") or "").strip()
    if not label:
        return None
    x, y, w, h = (float(row[k]) for k in BOX_COLUMNS)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"box {x}, {y}, {w}, {h} is not a finite box with positive width and height")
    return LesionBox(normalise_label(label), x, y, w, h)


def read_labelled_set(data_dir: Path) -> list[LabelledImage]:
    """Parse ``labels.csv`` (and ``bboxes.csv`` if present); raise with the row number for malformed rows."""
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
                box = _read_box(row)
            except (TypeError, ValueError, KeyError) as exc:
                raise EvaluationError(f"{labels_csv}, line {line}: {exc}") from exc
            if abnormal not in (0, 1):
                raise EvaluationError(f"{labels_csv}, line {line}: abnormal must be 0 or 1")
            findings = frozenset(
                normalise_label(x)
                for x in row["finding_labels"].split("|")
                if x.strip() and x != "No Finding"
            )
            rows.append(
                LabelledImage(
                    file=row["file"],
                    findings=findings,
                    abnormal=abnormal,
                    view=(row.get("view") or "").strip().upper(),
                    boxes=(box,) if box else (),
                )
            )
    if not rows:
        raise EvaluationError(f"{labels_csv}: no rows")
    extra = read_extra_boxes(data_dir / "bboxes.csv", {r.file for r in rows})
    return [replace(r, boxes=extra[r.file]) if r.file in extra else r for r in rows]


def read_extra_boxes(path: Path, known_files: set[str]) -> dict[str, tuple[LesionBox, ...]]:
    """``bboxes.csv``: every box of each image it names (those replace the labels.csv box)."""
    if not path.is_file():
        return {}
    boxes: dict[str, list[LesionBox]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("file", "bbox_label", *BOX_COLUMNS) if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationError(f"{path}: missing columns {missing}")
        for line, row in enumerate(reader, start=2):
            if row["file"] not in known_files:
                raise EvaluationError(f"{path}, line {line}: {row['file']!r} is not in labels.csv")
            try:
                box = _read_box(row)
            except (TypeError, ValueError) as exc:
                raise EvaluationError(f"{path}, line {line}: {exc}") from exc
            if box is None:
                raise EvaluationError(f"{path}, line {line}: bbox_label is empty")
            boxes.setdefault(row["file"], []).append(box)
    return {file: tuple(b) for file, b in boxes.items()}


@dataclass(frozen=True)
class BoxCheck:
    """Did the peak of one heatmap fall inside one image's boxes of one finding?"""

    box_label: str  # normalised finding name of the boxes
    heatmap_label: str  # the model label whose heatmap was used
    hit: bool
    chance: float  # share of heatmap cells whose centre lies inside those boxes


@dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (n, labels)
    abnormal_scores: np.ndarray  # (n,)
    own_label_checks: list[BoxCheck]  # boxes whose label the model has, that label's heatmap
    abnormal_checks: list[BoxCheck]  # every box, the heatmap behind the abnormal score


def abnormal_heatmap_label(card: ModelCard, probabilities: np.ndarray) -> str:
    """The label whose heatmap explains the abnormal score: ``label:NAME``, or the top label for ``max``."""
    rule = card.triage.abnormal_score
    if rule.startswith("label:"):
        return rule.split(":", 1)[1]
    return card.labels[int(np.argmax(probabilities))]


def check_boxes(
    heatmaps: np.ndarray, card: ModelCard, label: str, boxes: list[LesionBox], source_shape: tuple[int, int]
) -> BoxCheck:
    """Peak of ``label``'s heatmap vs the union of ``boxes``, with the same grid's chance rate."""
    record = heatmap_records(heatmaps, card.labels, [label], source_shape, card.input)[label]
    row, col = peak_in_source(record)
    grid_h, grid_w = np.asarray(record["grid"]).shape
    centres = [cell_centre(record, i, j) for i in range(grid_h) for j in range(grid_w)]
    inside = sum(any(b.contains(r, c) for b in boxes) for r, c in centres)
    return BoxCheck(
        box_label=boxes[0].label,
        heatmap_label=label,
        hit=any(b.contains(row, col) for b in boxes),
        chance=inside / len(centres),
    )


def predict_set(
    runner: ModelRunner,
    data_dir: Path,
    images: list[LabelledImage],
    progress: Callable[[int, int], None],
    *,
    reduced_decode: bool = True,
) -> Predictions:
    card = runner.card
    min_side = decode_min_side(card.input) if reduced_decode else 0  # JPEG 2000, as the server decodes
    model_labels = {normalise_label(label): label for label in card.labels}
    probabilities, abnormal_scores = [], []
    own_checks: list[BoxCheck] = []
    abnormal_checks: list[BoxCheck] = []
    for n, image in enumerate(images, start=1):
        path = data_dir / "images" / image.file
        if not path.exists():
            path = data_dir / image.file
        display = read_any_display(path, min_side=min_side)
        out = runner.run(to_model_input(display.pixels, card.input)[None])
        probs = out.probabilities[0]
        probabilities.append(probs)
        abnormal_scores.append(score(probs, card).abnormal_score)
        if out.heatmaps is not None:
            by_label: dict[str, list[LesionBox]] = {}
            for box in image.boxes:
                by_label.setdefault(box.label, []).append(box)
            for box_label, boxes in by_label.items():
                if box_label in model_labels:
                    own_checks.append(
                        check_boxes(
                            out.heatmaps[0], card, model_labels[box_label], boxes, display.source_shape
                        )
                    )
                label = abnormal_heatmap_label(card, probs)
                abnormal_checks.append(check_boxes(out.heatmaps[0], card, label, boxes, display.source_shape))
        progress(n, len(images))
    return Predictions(np.asarray(probabilities), np.asarray(abnormal_scores), own_checks, abnormal_checks)


def summarise_box_checks(checks: list[BoxCheck]) -> dict[str, Any]:
    """Hits, n, rate and chance rate overall and per boxed finding."""
    by_label: dict[str, dict[str, int]] = {}
    for c in checks:
        entry = by_label.setdefault(c.box_label, {"hits": 0, "n": 0})
        entry["hits"] += int(c.hit)
        entry["n"] += 1
    hits = sum(c.hit for c in checks)
    return {
        "hits": int(hits),
        "n": len(checks),
        "rate": _round(hits / len(checks)),
        "chance_rate": _round(sum(c.chance for c in checks) / len(checks)),
        "by_box_label": dict(sorted(by_label.items())),
    }


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


def operating_point_rule(card: ModelCard, label: str) -> str:
    """How the card says ``label``'s threshold was chosen (``[threshold_selection]``), "" if it does not."""
    selection = card.extra.get("threshold_selection", {})
    entry = selection.get(label, {})
    if isinstance(entry, dict) and entry.get("rule"):
        return str(entry["rule"])
    return "youden_j" if isinstance(entry, dict) and "youden_j" in entry else str(selection.get("method", ""))


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
            "urgent": label in card.triage.urgent_labels,
            "operating_point": operating_point_rule(card, label),
        }
    priorities = [score(p, card).priority for p in preds.probabilities]
    result["urgent_share"] = (
        _round(sum(p == "urgent" for p in priorities) / len(priorities)) if priorities else None
    )
    if preds.own_label_checks:
        result["heatmap_peak_in_box"] = summarise_box_checks(preds.own_label_checks)
    if preds.abnormal_checks:
        result["abnormal_heatmap_peak_in_box"] = {
            "heatmap": card.triage.abnormal_score,
            **summarise_box_checks(preds.abnormal_checks),
        }
    return result


def evaluate(
    runner: ModelRunner,
    data_dir: Path,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
    reduced_decode: bool = True,
) -> dict[str, Any]:
    """Everything ``models evaluate`` reports; ``reduced_decode``: the ``j2k_reduced_decode`` setting."""
    data_dir = Path(data_dir)
    images = read_labelled_set(data_dir)

    def progress(done: int, total: int) -> None:
        if show_progress and (done % 20 == 0 or done == total):
            print(f"  evaluated {done}/{total} images", file=sys.stderr, flush=True)

    preds = predict_set(runner, data_dir, images, progress, reduced_decode=reduced_decode)
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
    lines.append(
        f"{'label':<20} {'n+':>4} {'AUROC':>6} {'95% CI':>13} {'thresh':>7} {'sens':>6} {'spec':>6}  operating point"
    )
    for label, d in result["per_label"].items():
        ci = f"{fmt(d['ci95'][0])}-{fmt(d['ci95'][1])}"
        rule = (d["operating_point"] or "-") + ("; URGENT label" if d["urgent"] else "")
        lines.append(
            f"{label:<20} {d['n_positive']:>4} {fmt(d['auroc']):>6} {ci:>13} {d['threshold']:>7.3f} "
            f"{fmt(d['sensitivity']):>6} {fmt(d['specificity']):>6}  {rule}"
        )
    if result.get("urgent_share") is not None:
        lines.append(f"Urgent under the card's triage rules: {result['urgent_share']:.1%} of the images")
    if "heatmap_peak_in_box" in result or "abnormal_heatmap_peak_in_box" in result:
        lines.append("")
    if "heatmap_peak_in_box" in result:
        lines.append(
            "Heatmap peak inside the lesion box, boxed label's own heatmap: "
            + _box_line(result["heatmap_peak_in_box"])
        )
    if "abnormal_heatmap_peak_in_box" in result:
        h = result["abnormal_heatmap_peak_in_box"]
        lines.append(
            f"Heatmap peak inside the lesion box, abnormal-score heatmap ({h['heatmap']}): " + _box_line(h)
        )
    return "\n".join(lines)


def _box_line(h: dict[str, Any]) -> str:
    per = ", ".join(f"{label} {d['hits']}/{d['n']}" for label, d in h["by_box_label"].items())
    return f"{h['hits']}/{h['n']} (chance {h['chance_rate']:.2f}; {per})"
