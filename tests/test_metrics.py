"""Tests of engine/metrics.py against brute-force definitions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refteacher.engine.metrics import (
    auroc,
    confusion_counts,
    precision_recall_fpr,
    threshold_for_fpr,
    threshold_for_recall,
)


def brute_force_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


scored_sets = st.lists(
    st.tuples(st.integers(-5, 5).map(lambda v: v / 2), st.booleans()), min_size=2, max_size=40
).filter(lambda rows: 0 < sum(y for _, y in rows) < len(rows))


@settings(max_examples=200, deadline=None)
@given(scored_sets)
def test_auroc_matches_pairwise_count_with_ties(rows):
    scores, labels = zip(*rows)
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_inputs_and_edges():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=300)
    labels = rng.random(300) < 0.3
    expected = brute_force_auroc(scores.tolist(), labels.tolist())
    assert auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)) == pytest.approx(expected, abs=1e-6)
    assert auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match=r"scores \(2\) and labels \(1\) differ in length"):
        auroc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 0.2], [1, 0])


@settings(max_examples=200, deadline=None)
@given(scored_sets, st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_threshold_for_recall_is_the_highest_meeting_the_target(rows, target):
    scores, labels = zip(*rows)
    t = threshold_for_recall(scores, labels, target)
    recall = precision_recall_fpr(scores, labels, t).recall
    assert recall >= target - 1e-12
    # both comparison conventions flag the same prompts
    assert confusion_counts(scores, labels, t) == confusion_counts(np.array(scores), labels, np.nextafter(t, np.inf))
    # any higher threshold that drops one more positive misses the target
    for score, label in rows:
        if label and score > t:
            assert precision_recall_fpr(scores, labels, np.nextafter(score, np.inf)).recall < target


@settings(max_examples=200, deadline=None)
@given(scored_sets, st.sampled_from([0.0, 0.05, 0.1, 0.5]))
def test_threshold_for_fpr_is_the_lowest_meeting_the_target(rows, target):
    scores, labels = zip(*rows)
    t = threshold_for_fpr(scores, labels, target)
    assert precision_recall_fpr(scores, labels, t).fpr <= target + 1e-12
    # any lower threshold that flags one more negative exceeds the target
    for score, label in rows:
        if not label and score < t:
            assert precision_recall_fpr(scores, labels, score).fpr > target


def test_precision_recall_fpr_by_hand():
    scores = [0.9, 0.8, 0.7, 0.4, 0.3, 0.1]
    labels = [1, 0, 1, 1, 0, 0]
    assert confusion_counts(scores, labels, 0.7) == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    p, r, f = precision_recall_fpr(scores, labels, 0.7)
    assert (p, r, f) == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    only_negatives = precision_recall_fpr([0.2, 0.6], [0, 0], 0.5)
    assert np.isnan(only_negatives.recall) and only_negatives.fpr == 0.5 and only_negatives.precision == 0.0
    assert np.isnan(precision_recall_fpr([0.2], [1], 0.5).precision)
    with pytest.raises(ValueError, match="threshold_for_recall needs at least one positive"):
        threshold_for_recall([0.1], [0], 0.9)
    with pytest.raises(ValueError, match=r"target_recall must be in \(0, 1\], got 0.0"):
        threshold_for_recall([0.1, 0.2], [0, 1], 0.0)
