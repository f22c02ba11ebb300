"""From model probabilities to what a clinician sees: flagged findings and a priority.

All rules come from the model card: per-label thresholds, how ``abnormal_score``
is computed and which labels make an image ``urgent``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xray_triage.inference.card import ModelCard
from xray_triage.priority import PRIORITY_ABNORMAL, PRIORITY_NORMAL, PRIORITY_URGENT


@dataclass(frozen=True)
class Score:
    probabilities: dict[str, float]
    flagged: list[str]  # labels at or above their threshold, most probable first
    abnormal_score: float
    priority: str


def score(probabilities: np.ndarray, card: ModelCard) -> Score:
    """Apply the card's thresholds and triage rules to one image's probabilities."""
    probs = {label: round(float(p), 6) for label, p in zip(card.labels, probabilities, strict=True)}
    flagged = sorted(
        (label for label, p in probs.items() if p >= card.thresholds[label]),
        key=lambda label: -probs[label],
    )
    rule = card.triage.abnormal_score
    abnormal = max(probs.values()) if rule == "max" else probs[rule.removeprefix("label:")]
    if any(label in card.triage.urgent_labels for label in flagged):
        priority = PRIORITY_URGENT
    elif flagged or abnormal >= card.triage.abnormal_threshold:
        priority = PRIORITY_ABNORMAL
    else:
        priority = PRIORITY_NORMAL
    return Score(
        probabilities=probs, flagged=flagged, abnormal_score=round(float(abnormal), 6), priority=priority
    )
