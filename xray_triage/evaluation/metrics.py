"""Classification metrics for model cards, in plain numpy (no scikit-learn).

Used by ``model_tools/train.py`` to fill a card's ``[evaluation]`` and ``[thresholds]``
tables, and meant to be reused by the server's ``models evaluate`` command, so it
depends on numpy only.

- :func:`auroc` — area under the ROC curve via the Mann–Whitney U statistic
  (ties count one half), identical to the trapezoidal ROC area.
- :func:`bootstrap_ci` — percentile bootstrap confidence interval of any
  ``metric(y_true, y_score)``, seeded so a card's numbers can be reproduced.
- :func:`youden_threshold` — the score cut-off that maximises Youden's J
  (sensitivity + specificity - 1).
- :func:`sens_spec` — sensitivity and specificity when "flagged" means
  ``score >= threshold`` (the server's rule, see ``inference/card.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ConfidenceInterval",
    "auroc",
    "bootstrap_ci",
    "youden_threshold",
    "sens_spec",
    "rankdata",
]


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (like scipy's 'average')."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals)) + 1]
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = 0.5 * (start + 1 + end)  # mean of ranks start+1 .. end
    return ranks


def _binary(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if not np.isin(y, (0, 1, False, True)).all():
        raise ValueError("y_true must hold only 0/1 values")
    return y.astype(bool)


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > random negative).

    Computed from the Mann–Whitney U statistic with average ranks (a tie counts
    1/2). Returns ``nan`` when ``y_true`` lacks positives or negatives.
    """
    y = _binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise ValueError("y_true and y_score differ in length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class ConfidenceInterval:
    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int  # resamples that gave a finite value
    method: str = "percentile bootstrap"


def bootstrap_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float] = auroc,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> ConfidenceInterval:
    """Percentile bootstrap CI of ``metric`` (default AUROC).

    Cases are resampled with replacement; with ``groups`` (e.g. patient ids) whole
    groups are resampled so images of one patient stay together. Resamples in which
    the metric is undefined (one class missing) are dropped; ``n_resamples`` in the
    result says how many were used.
    """
    y = np.asarray(y_true).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    estimate = float(metric(y, s))
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        g = np.asarray(groups).ravel()
        _, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    n_units = len(members)
    stats = []
    for _ in range(n_resamples):
        pick = rng.integers(0, n_units, size=n_units)
        idx = np.concatenate([members[k] for k in pick]) if groups is not None else pick
        value = metric(y[idx], s[idx])
        if np.isfinite(value):
            stats.append(value)
    if not stats:
        return ConfidenceInterval(estimate, float("nan"), float("nan"), level, 0)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(np.asarray(stats), [alpha, 1.0 - alpha])
    return ConfidenceInterval(estimate, float(low), float(high), level, len(stats))


def sens_spec(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of the rule ``score >= threshold``."""
    y = _binary(y_true)
    flagged = np.asarray(y_score, dtype=np.float64).ravel() >= threshold
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    sens = float((flagged & y).sum() / n_pos) if n_pos else float("nan")
    spec = float((~flagged & ~y).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def specificity_threshold(y_true: np.ndarray, y_score: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity (rule ``score >= threshold``) is at least ``target``.

    The operating point for alarm-prone labels: it bounds the share of negatives flagged
    (``1 - target``) and, among thresholds that do, keeps the most sensitivity. Candidates
    are midpoints between consecutive distinct scores, as in :func:`youden_threshold`
    (so the rule does not hinge on one case's exact value). Raises ``ValueError`` without
    negatives or for a ``target`` outside (0, 1].
    """
    y = _binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.all():
        raise ValueError("specificity_threshold needs negatives")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target specificity must be in (0, 1], not {target}")
    distinct = np.unique(s)
    candidates = np.concatenate([[distinct[0]], (distinct[:-1] + distinct[1:]) / 2.0, [distinct[-1] + 1e-6]])
    negatives = s[~y]
    for threshold in candidates:  # ascending: the first that reaches the target keeps the most sensitivity
        if float((negatives < threshold).mean()) >= target:
            return float(threshold)
    return float(candidates[-1])


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> tuple[float, float]:
    """Threshold maximising Youden's J = sensitivity + specificity - 1.

    Candidates are the midpoints between consecutive distinct scores (so the
    rule ``score >= threshold`` does not hinge on one case's exact value), plus
    the extremes. Ties in J are broken towards the lower threshold (higher
    sensitivity, the safer side for triage). Returns ``(threshold, J)``.
    """
    y = _binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.all() or not y.any():
        raise ValueError("youden_threshold needs both positives and negatives")
    distinct = np.unique(s)
    mids = (distinct[:-1] + distinct[1:]) / 2.0
    candidates = np.r_[distinct[0], mids, np.nextafter(distinct[-1], np.inf)]
    best_t, best_j = float(candidates[0]), -np.inf
    for t in candidates:  # ascending, so ">" keeps the lowest of tied thresholds
        sens, spec = sens_spec(y, s, float(t))
        j = sens + spec - 1.0
        if j > best_j + 1e-12:
            best_t, best_j = float(t), j
    return best_t, float(best_j)
