"""Metrics against independent computations (pairwise counts written from the definitions)."""
import itertools

import numpy as np
import pandas as pd
import pytest

from benchmark.metrics import c_index, classification_metrics, compute_metrics


def pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_c_index(time, event, risk):
    concordant = comparable = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        # i died first (or at the time j was censored): i should have the higher risk
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            comparable += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_binary_metrics_match_definitions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 60), 0, 1).round(2)  # rounding makes ties
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(labels, probs)
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(pairwise_auc(labels, p1), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(pred == labels))
    recalls = [np.mean(pred[labels == c] == c) for c in (0, 1)]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    f1s = []
    for c in (0, 1):
        tp = np.sum((pred == c) & (labels == c))
        f1s.append(2 * tp / (np.sum(pred == c) + np.sum(labels == c)))
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))


def test_multiclass_auc_is_macro_one_vs_rest():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 15)
    logits = rng.normal(size=(45, 3)) + np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.mean([pairwise_auc((labels == c).astype(int), probs[:, c]) for c in range(3)])
    assert classification_metrics(labels, probs)["auc"] == pytest.approx(expected)


def test_c_index_matches_pairwise_count():
    rng = np.random.default_rng(2)
    time = rng.uniform(1, 50, 40).round(0)  # ties in time
    event = rng.integers(0, 2, 40)
    risk = (-time / 10 + rng.normal(size=40)).round(1)  # ties in risk
    assert c_index(time, event, risk) == pytest.approx(naive_c_index(time, event, risk), abs=1e-12)


def test_single_class_partition_gives_nan_auc():
    preds = pd.DataFrame({"label": [1, 1], "prob_0": [0.2, 0.6], "prob_1": [0.8, 0.4]})
    m = compute_metrics("classification", preds)
    assert np.isnan(m["auc"]) and m["accuracy"] == 0.5


def test_c_index_without_comparable_pairs_is_nan():
    # no event at all, and an event only after the other patient's censoring: no pair can be ordered
    assert np.isnan(c_index(np.array([5.0, 9.0]), np.array([0, 0]), np.array([0.1, 0.2])))
    assert np.isnan(c_index(np.array([5.0, 9.0]), np.array([0, 1]), np.array([0.1, 0.2])))
