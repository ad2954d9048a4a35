"""Metrics in plain numpy: AUROC, Cohen's kappa, ROC curves, bootstrap intervals,
temperature scaling and operating thresholds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN if one class."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    thr = np.unique(s)[::-1]
    tpr = np.array([np.mean(s[y] >= t) if y.any() else 0.0 for t in thr])
    fpr = np.array([np.mean(s[~y] >= t) if (~y).any() else 0.0 for t in thr])
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0], np.r_[np.inf, thr, -np.inf]


def cohen_kappa(y: np.ndarray, pred: np.ndarray) -> float:
    """Cohen's kappa of two binary (or integer) label vectors."""
    y = np.asarray(y).astype(int)
    p = np.asarray(pred).astype(int)
    labels = np.union1d(y, p)
    po = float(np.mean(y == p))
    pe = float(sum(np.mean(y == c) * np.mean(p == c) for c in labels))
    return float((po - pe) / (1.0 - pe)) if pe < 1.0 else float("nan")


def binary_summary(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, kappa, accuracy at ``prob >= threshold``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(prob) >= threshold
    tp = int(np.sum(pred & y))
    tn = int(np.sum(~pred & ~y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    return {
        "sensitivity": tp / max(1, tp + fn),
        "specificity": tn / max(1, tn + fp),
        "kappa": cohen_kappa(y, pred),
        "accuracy": (tp + tn) / max(1, len(y)),
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }


def bootstrap_ci(
    stat: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = 2000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile 95% interval of ``stat(indices)`` over resamples.

    ``groups`` (same length as the data) resamples whole groups (e.g. patients), so
    correlated items stay together.
    """
    rng = np.random.default_rng(seed)
    values: list[float] = []
    if groups is None:
        for _ in range(n_boot):
            v = stat(rng.integers(0, n, size=n))
            if np.isfinite(v):
                values.append(v)
    else:
        uniq, inv = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
        for _ in range(n_boot):
            pick = rng.integers(0, len(uniq), size=len(uniq))
            v = stat(np.concatenate([members[g] for g in pick]))
            if np.isfinite(v):
                values.append(v)
    if not values:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature T > 0 minimising the binary NLL of ``sigmoid(logits / T)``."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def nll(t: float) -> float:
        p = np.clip(sigmoid(logits / t), 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    grid = np.exp(np.linspace(np.log(0.2), np.log(10.0), 400))
    losses = [nll(t) for t in grid]
    return float(grid[int(np.argmin(losses))])


def choose_threshold(y: np.ndarray, prob: np.ndarray, rule: str = "kappa") -> float:
    """Operating threshold maximising Cohen's kappa (``rule="kappa"``) or Youden's J."""
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float64)
    candidates = np.unique(prob)
    best_t, best_v = 0.5, -np.inf
    for t in candidates:
        s = binary_summary(y, prob, float(t))
        v = s["kappa"] if rule == "kappa" else s["sensitivity"] + s["specificity"] - 1.0
        if np.isfinite(v) and v > best_v:
            best_t, best_v = float(t), float(v)
    # place the threshold half-way to the next lower score, so it is not on a data point
    lower = candidates[candidates < best_t]
    if len(lower):
        best_t = 0.5 * (best_t + float(lower.max()))
    return best_t


def threshold_for_sensitivity(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    """The highest threshold at which at least ``target`` of the positives score at or
    above it, placed half-way to the next lower score (not on a data point)."""
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=np.float64)
    pos = np.sort(prob[y])[::-1]
    if not len(pos):
        raise ValueError("no positives to choose a sensitivity threshold on")
    t = float(pos[min(len(pos), int(np.ceil(target * len(pos) - 1e-9))) - 1])
    lower = prob[prob < t]
    return 0.5 * (t + float(lower.max())) if len(lower) else t


def study_means(
    keys: Sequence[str], values: np.ndarray, labels: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean of ``values`` per study key (MURA's rule) and the study label (max)."""
    order: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        order.setdefault(k, []).append(i)
    study_keys = list(order)
    means = np.array([float(np.mean(values[order[k]])) for k in study_keys])
    labs = np.array([int(np.max(labels[order[k]])) for k in study_keys])
    return study_keys, means, labs
