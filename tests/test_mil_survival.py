"""The survival head as the baselines use it: NLL against an independent implementation, bins from
uncensored training times (the C-index against a naive pairwise count is in test_metrics.py)."""

import numpy as np
import torch

from methods.losses import nll_survival_loss, survival_bin_edges, survival_bins, survival_risk


def likelihood_loss(logits, bins, censored):
    """Per patient, the discrete-time likelihood written out: an event in bin y has probability
    prod_{j<y}(1 - h_j) * h_y; a patient censored in bin y survived bins 0..y: prod_{j<=y}(1 - h_j)."""
    losses = []
    for row, y, c in zip(logits, bins, censored):
        h = [1 / (1 + np.exp(-v)) for v in row]
        survived_before = np.prod([1 - h[j] for j in range(y)]) if y > 0 else 1.0
        if c:
            losses.append(-np.log(max(survived_before * (1 - h[y]), 1e-7)))
        else:
            losses.append(-np.log(max(survived_before, 1e-7)) - np.log(max(h[y], 1e-7)))
    return float(np.mean(losses))


def test_nll_equals_independent_likelihood():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 4)) * 2
    bins = rng.integers(0, 4, size=16)
    censored = (rng.random(16) < 0.4).astype(float)
    ours = nll_survival_loss(torch.tensor(logits), torch.tensor(bins), torch.tensor(censored))
    np.testing.assert_allclose(float(ours), likelihood_loss(logits, bins, censored), rtol=1e-5)


def test_risk_is_minus_sum_of_survival():
    logits = np.array([[0.3, -1.0, 2.0, 0.1]])
    h = 1 / (1 + np.exp(-logits[0]))
    expected = -sum(np.prod(1 - h[: k + 1]) for k in range(4))
    np.testing.assert_allclose(float(survival_risk(torch.tensor(logits))[0]), expected, rtol=1e-6)


def test_bins_from_uncensored_quartiles_cover_everyone():
    times = np.array([1, 2, 3, 4, 5, 6, 7, 8, 50, 0.5], dtype=float)
    events = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    edges = survival_bin_edges(times, events)
    np.testing.assert_allclose(edges[1:-1], [2, 3, 4])  # quartiles of 1..5, the uncensored times
    bins = survival_bins(times, edges)
    assert bins.min() == 0 and bins.max() == 3
    assert list(bins[:5]) == [0, 1, 2, 3, 3]


