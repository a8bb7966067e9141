"""The survival loss against an independent (numpy, loop-based) implementation of the formula, and the
per-patient loss targets every method trains on."""
import numpy as np
import pandas as pd
import pytest
import torch

from datasets.cohorts.base import Task
from methods.losses import EPS, loss_targets, nll_survival_loss, survival_bin_edges, survival_bins, survival_risk


def reference_nll(logits, y, c, alpha=0.0, eps=1e-7):
    total = 0.0
    for row, yi, ci in zip(logits, y, c):
        h = 1 / (1 + np.exp(-row))
        s = [1.0]
        for hk in h:
            s.append(s[-1] * (1 - hk))  # s[k] = S(k-1), s[0] = 1
        unc = -(1 - ci) * (np.log(max(s[yi], eps)) + np.log(max(h[yi], eps)))
        cen = -ci * np.log(max(s[yi + 1], eps))
        total += (1 - alpha) * (unc + cen) + alpha * unc
    return total / len(y)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_nll_matches_reference(alpha):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 4))
    y = rng.integers(0, 4, 16)
    c = rng.integers(0, 2, 16)
    got = nll_survival_loss(torch.tensor(logits), torch.tensor(y), torch.tensor(c), alpha=alpha)
    assert got.item() == pytest.approx(reference_nll(logits, y, c, alpha), rel=1e-6)


def test_risk_is_minus_sum_of_survival():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    h = torch.sigmoid(logits)[0].tolist()
    s, total = 1.0, 0.0
    for hk in h:
        s *= 1 - hk
        total += s
    assert survival_risk(logits).item() == pytest.approx(-total)


def test_bins_from_uncensored_quartiles_cover_everyone():
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 50.0, 0.5])
    events = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    edges = survival_bin_edges(times, events)
    assert edges[1:-1] == pytest.approx(np.quantile(times[:8], [0.25, 0.5, 0.75]))
    assert edges[0] < 0.5 and edges[-1] > 50
    bins = survival_bins(times, edges)
    assert bins.min() == 0 and bins.max() == 3
    assert list(survival_bins([1.0, 8.0, 50.0, 0.5], edges)) == [0, 3, 3, 0]


# a fold: a-f train (f censored, late), g and h held out (g's event at 100 would move the quartiles)
SURVIVAL = pd.DataFrame({"time": [2.0, 4, 6, 8, 10, 50, 100, 1], "event": [1, 1, 1, 1, 1, 0, 1, 0]},
                        index=list("abcdefgh"))


def test_survival_targets_take_their_bins_from_the_training_patients_only():
    targets, edges = loss_targets(SURVIVAL, Task("os", "survival", 4), train_patients=("a", "b", "c", "d", "e", "f"))
    # by hand: quartiles of the uncensored training times 2, 4, 6, 8, 10; the outer edges take in f's 50
    assert edges == [2 - EPS, 4, 6, 8, 50 + EPS]
    assert [int(targets[p]["bin"]) for p in "abcdefgh"] == [0, 1, 2, 3, 3, 3, 3, 0]
    assert [float(targets[p]["censored"]) for p in "abcdefgh"] == [0, 0, 0, 0, 0, 1, 0, 1]
    everyone, _ = loss_targets(SURVIVAL, Task("os", "survival", 4), train_patients=list("abcdefgh"))
    assert int(everyone["b"]["bin"]) == 0  # had g's time shaped the bins, b would move (4 < 4.5)


def test_loss_targets_are_what_task_loss_takes():
    targets, edges = loss_targets(pd.DataFrame({"label": [1, 0]}, index=["a", "b"]), Task("t", "classification", 2), ["a"])
    assert edges is None and targets["a"]["label"].dtype == torch.int64 and int(targets["a"]["label"]) == 1
    survival, _ = loss_targets(SURVIVAL, Task("os", "survival", 4), list("abcdef"))
    assert survival["f"]["bin"].shape == () and survival["f"]["bin"].dtype == torch.int64
    assert survival["f"]["censored"].dtype == torch.float32
