"""Choose the urgent labels' operating points on TRAIN's validation split; rewrite the cards.

Why: with Youden's J, the shipped demo model flagged 6 of the 8 sample studies (and 61% of
DEV) "urgent"; Youden's J weighs a missed finding and a false alarm alike, and on a few
positives (7 Effusion images in the validation split) it chose very low thresholds. An
urgent flag interrupts a specialist, so the labels that make a study urgent (the card's
``[triage].urgent_labels``) get the **lowest threshold with specificity >= the target**
(default 0.90) on the validation split (``metrics.specificity_threshold``): at most about
one negative in ten is flagged per label, and sensitivity is whatever that leaves, written
down beside it. The other labels keep their Youden thresholds (they never make a study
urgent). No threshold is chosen on DEV; DEV's sensitivity/specificity at the new points
are recomputed (what ``xray-triage models evaluate`` prints) and written to ``[evaluation]``.

Usage (no torch; the validation split comes from ``train.py --write-validation-set``)::

    python models/train.py --write-validation-set /tmp/valset
    python -m model_tools.operating_points --validation /tmp/valset --dev ../shared/data/cxr

Rewrites ``model.toml``, ``model.int8.toml`` and ``model.fp16.toml`` of ``--model-dir``
through the one card writer (``card_toml.write_card``), keeping their comments; the ONNX
files and their sha256 are untouched. Variant cards get the same thresholds and their
``[variant.accuracy].priority_agreement`` recomputed on DEV at the new thresholds.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from model_tools.card_toml import write_card
from model_tools.train import CARD_COMMENTS
from xray_triage.evaluation.evaluate import LabelledImage, normalise_label, predict_set, read_labelled_set
from xray_triage.evaluation.metrics import auroc, sens_spec, specificity_threshold
from xray_triage.inference.card import ModelCard, load_card
from xray_triage.inference.runner import ModelRunner
from xray_triage.settings import DEFAULT_MODEL_DIR
from xray_triage.triage.scoring import score

DIGITS = 6
METHOD = "urgent labels: lowest threshold with specificity >= {target} on the validation split; other labels: Youden's J"
_TABLE = re.compile(r"^\[([^\[\]]+)\]\s*$")


def card_layout(text: str) -> tuple[str, dict[str, str]]:
    """(header, comments by table) of a card's text, as ``write_card`` takes them back."""
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        header.append(lines[i][2:] if lines[i].startswith("# ") else lines[i][1:])
        i += 1
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in lines[i:]:
        match = _TABLE.match(line)
        if line.startswith("#"):
            block.append(line[2:] if line.startswith("# ") else line[1:])
            continue
        if match and block:
            comments[match.group(1)] = "\n".join(block)
        block = [] if line.strip() == "" or match else block
        if not match and line.strip():
            block = []
    return "\n".join(header), comments


def _truth(images: list[LabelledImage], label: str) -> np.ndarray:
    key = normalise_label(label)
    if key == "abnormal":
        return np.array([i.abnormal for i in images])
    return np.array([int(key in i.findings) for i in images])


def _urgent_share(card: ModelCard, probabilities: np.ndarray, thresholds: dict[str, float]) -> float:
    rules = dataclasses.replace(card, thresholds=thresholds)
    return float(np.mean([score(p, rules).priority == "urgent" for p in probabilities]))


def _predict(runner: ModelRunner, data: Path) -> tuple[list[LabelledImage], np.ndarray]:
    images = read_labelled_set(data)
    return images, predict_set(runner, data, images, lambda done, total: None).probabilities


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validation", type=Path, required=True, help="train.py --write-validation-set DIR")
    parser.add_argument("--dev", type=Path, required=True, help="the evaluation set (shared/data/cxr)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--target-specificity", type=float, default=0.90)
    args = parser.parse_args(argv)

    card = load_card(args.model_dir)
    runner = ModelRunner(card, providers=["CPUExecutionProvider"])
    val_images, val_p = _predict(runner, args.validation)
    dev_images, dev_p = _predict(runner, args.dev)
    old = dict(card.thresholds)
    new = dict(old)
    chosen: dict[str, dict[str, Any]] = {}
    for label in card.triage.urgent_labels:
        k = card.labels.index(label)
        y = _truth(val_images, label)
        t = round(specificity_threshold(y, val_p[:, k], args.target_specificity), DIGITS)
        new[label] = t
        sens, spec = sens_spec(y, val_p[:, k], t)
        chosen[label] = {
            "threshold": t,
            "rule": f"specificity >= {args.target_specificity}",
            "sensitivity": sens,
            "specificity": spec,
            "auroc": auroc(y, val_p[:, k]),
            "n_pos": int(y.sum()),
            "youden_threshold_before": old[label],
        }
        print(f"{label}: threshold {old[label]} -> {t}; validation sensitivity {sens:.3f}, specificity {spec:.3f}")
    shares = {
        "urgent_share_validation_before": _urgent_share(card, val_p, old),
        "urgent_share_validation": _urgent_share(card, val_p, new),
        "urgent_share_dev_before": _urgent_share(card, dev_p, old),
        "urgent_share_dev": _urgent_share(card, dev_p, new),
    }
    print({k: round(v, 3) for k, v in shares.items()})
    dev_numbers = {}
    for label in card.triage.urgent_labels:
        k = card.labels.index(label)
        sens, spec = sens_spec(_truth(dev_images, label), dev_p[:, k], new[label])
        dev_numbers[label] = {"threshold": new[label], "sensitivity": sens, "specificity": spec}
        print(f"{label}: DEV sensitivity {sens:.3f}, specificity {spec:.3f}")

    base_card = dataclasses.replace(card, thresholds=new)
    base_priorities = [score(p, base_card).priority for p in dev_p]
    for name in ("model.toml", "model.int8.toml", "model.fp16.toml"):
        path = args.model_dir / name
        text = path.read_text(encoding="utf-8")
        tables = tomllib.loads(text)
        header, comments = card_layout(text)
        tables["thresholds"] = {label: new[label] for label in tables["thresholds"]}
        selection = tables["threshold_selection"]
        selection["method"] = METHOD.format(target=args.target_specificity)
        selection["why"] = (
            "alarm fatigue: at the Youden thresholds 6 of the 8 sample studies (shared/data/dicom) and "
            f"{shares['urgent_share_dev_before']:.0%} of DEV were urgent; an urgent flag interrupts a specialist, so "
            "the labels that make a study urgent are held to a target specificity (model_tools/operating_points.py)"
        )
        selection.update(shares)
        for label, numbers in chosen.items():
            entry = {k: v for k, v in selection.get(label, {}).items() if k not in ("youden_j",)}
            entry.update(numbers)
            selection[label] = entry
        for label, numbers in dev_numbers.items():
            tables["evaluation"]["labels"][label].update(numbers)
        if "variant" in tables:
            variant_card = load_card(args.model_dir, variant=tables["variant"]["name"])
            variant_runner = ModelRunner(variant_card, providers=["CPUExecutionProvider"])
            _, variant_p = _predict(variant_runner, args.dev)
            variant_rules = dataclasses.replace(variant_card, thresholds=new)
            agree = np.mean([score(p, variant_rules).priority == b for p, b in zip(variant_p, base_priorities, strict=True)])
            tables["variant"]["accuracy"]["priority_agreement"] = float(agree)
            print(f"{name}: priority agreement with fp32 on DEV {agree:.3f}")
        comments["thresholds"] = CARD_COMMENTS["thresholds"]
        write_card(path, tables, header=header, comments=comments, digits=DIGITS)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
