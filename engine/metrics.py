"""Detection metrics for scores where higher means "more likely harmful".

Conventions shared by every function here:

- ``labels`` are 1/True for a positive (harmful) prompt and 0/False for a negative (harmless) one.
- A prompt is *flagged* when ``score >= threshold``. Thresholds returned by the ``threshold_for_*``
  functions lie strictly between two observed scores, so ``score > threshold`` flags exactly the
  same prompts on the scores they were chosen from.

Inputs may be lists, numpy arrays or torch tensors; everything is computed in float64.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def _as_arrays(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float64 [N], labels bool [N]); ValueError on shape mismatch or NaN."""
    if hasattr(scores, "detach"):
        scores = scores.detach().to("cpu").double().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().to("cpu").numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, y


def auroc(scores: Any, labels: Any) -> float:
    """Return the area under the ROC curve: P(score of a random positive > score of a random negative),
    ties counting one half. ``scores`` [N], ``labels`` [N] (1 = positive). ValueError if a class is empty.
    """
    s, y = _as_arrays(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based ranks over runs of equal scores (ties)
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], s.size]
    average = (run_starts + run_ends + 1) / 2.0
    ranks[order] = np.repeat(average, run_ends - run_starts)
    rank_sum = ranks[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def threshold_for_recall(scores: Any, labels: Any, target_recall: float = 0.95) -> float:
    """Return the highest threshold whose recall on the positives is at least ``target_recall``.

    ``scores`` [N], ``labels`` [N]. The threshold sits halfway between the lowest positive score it
    must flag and the next lower observed score. ValueError without positives or a bad target.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    s, y = _as_arrays(scores, labels)
    positives = np.sort(s[y])[::-1]
    if positives.size == 0:
        raise ValueError("threshold_for_recall needs at least one positive")
    needed = int(np.ceil(target_recall * positives.size - 1e-9))
    kth = positives[needed - 1]
    below = np.sort(s[s < kth])[::-1]
    if below.size == 0:
        return float(np.nextafter(kth, -np.inf))
    return float((kth + below[0]) / 2.0)


def threshold_for_fpr(scores: Any, labels: Any, target_fpr: float = 0.05) -> float:
    """Return the lowest threshold whose false-positive rate on the negatives is at most ``target_fpr``.

    ``scores`` [N], ``labels`` [N]. The threshold sits halfway between the highest negative score
    left unflagged and the next higher observed score. ValueError without negatives or a bad target.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s, y = _as_arrays(scores, labels)
    negatives = np.sort(s[~y])[::-1]
    if negatives.size == 0:
        raise ValueError("threshold_for_fpr needs at least one negative")
    allowed = int(np.floor(target_fpr * negatives.size + 1e-9))
    # flag at most `allowed` negatives: stay above the (allowed+1)-th highest negative score
    boundary = negatives[allowed]
    above = np.sort(s[s > boundary])
    if above.size == 0:
        return float(np.nextafter(boundary, np.inf))
    return float((boundary + above[0]) / 2.0)


class PrecisionRecallFpr(NamedTuple):
    """Precision, recall and false-positive rate at one threshold (NaN where undefined)."""

    precision: float
    recall: float
    fpr: float


def confusion_counts(scores: Any, labels: Any, threshold: float) -> dict[str, int]:
    """Return {"tp", "fp", "tn", "fn"} when flagging ``score >= threshold``."""
    s, y = _as_arrays(scores, labels)
    flagged = s >= threshold
    return {
        "tp": int((flagged & y).sum()),
        "fp": int((flagged & ~y).sum()),
        "tn": int((~flagged & ~y).sum()),
        "fn": int((~flagged & y).sum()),
    }


def precision_recall_fpr(scores: Any, labels: Any, threshold: float) -> PrecisionRecallFpr:
    """Return (precision, recall, fpr) when flagging ``score >= threshold``.

    Precision is NaN when nothing is flagged, recall NaN without positives, fpr NaN without
    negatives (so a set of harmless prompts alone still gives its false-positive rate).
    """
    c = confusion_counts(scores, labels, threshold)
    nan = float("nan")
    precision = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else nan
    recall = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else nan
    fpr = c["fp"] / (c["fp"] + c["tn"]) if c["fp"] + c["tn"] else nan
    return PrecisionRecallFpr(precision, recall, fpr)


class PairedDifference(NamedTuple):
    """Mean of ``a - b`` over items both were scored on, its standard error, and the item count."""

    difference: float
    standard_error: float
    n: int


def paired_difference(a: Any, b: Any) -> PairedDifference:
    """Compare two models scored on the same items (e.g. 0/1 correct per task row).

    The standard error is that of the mean per-item difference (sample standard deviation over
    sqrt(n)): pairing removes the items both get right or both get wrong, so it is far smaller than
    the unpaired one when the models mostly agree. NaN standard error for fewer than two items.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two equal-length 1-D score lists, got shapes {x.shape} and {y.shape}")
    if x.size == 0:
        return PairedDifference(float("nan"), float("nan"), 0)
    d = x - y
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return PairedDifference(float(d.mean()), se, int(d.size))
