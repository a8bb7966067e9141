"""Uncertainty and paired comparisons for leaderboards, computed from result files alone.

- `bootstrap_ci`: percentile bootstrap on the pooled predictions of one method (the reported
  partition of every fold), resampling patients (all rows of a drawn patient come along: several
  seeds, or a `test` partition that every fold's model scores, give a patient several rows).
- `paired_bootstrap`: the same resampled patients for two methods; the difference of their metrics.
- `paired_fold_test`: paired t-test and Wilcoxon signed-rank test across folds.
- `risk_groups` / `logrank`: high- vs low-risk halves split at each fold's training median risk.

Generator contract (tests re-implement it): patients are sorted by id and resample b draws patients
`np.random.default_rng(seed).integers(0, n_patients, size=(n_resamples, n_patients))[b]`. A resample's
metric equals the metric of the concatenated rows of its drawn patients; we compute it vectorised, as
the metric with each row weighted by how often its patient was drawn, so 1,000 resamples take well
under a second. Resamples where the metric is undefined (one class only, no comparable pair) are
dropped. The interval is `np.percentile` (linear interpolation) of the remaining values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
from sksurv.compare import compare_survival
from sksurv.util import Surv

from benchmark.metrics import metric_names, probability_matrix

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
TIED_RISK_TOL = 1e-8  # as scikit-survival's concordance_index_censored


@dataclass(frozen=True)
class Interval:
    estimate: float  # the metric on all pooled rows
    low: float
    high: float
    n_valid: int  # resamples where the metric is defined


@dataclass(frozen=True)
class PairedBootstrap:
    diff: float  # metric(a) - metric(b) on the pooled rows of the common patients
    low: float
    high: float
    p: float  # two-sided: 2 x the smaller share of resampled differences on either side of 0
    n_patients: int
    n_valid: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class FoldComparison:
    n_folds: int
    mean_diff: float  # mean over folds of metric(a) - metric(b)
    t_p: float  # paired t-test (scipy.stats.ttest_rel); NaN when undefined
    wilcoxon_p: float  # Wilcoxon signed-rank (scipy.stats.wilcoxon); NaN when undefined


@dataclass(frozen=True)
class LogRank:
    chisq: float
    p: float


def resample_counts(n_patients: int, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, n_patients): how often each patient is drawn in each resample."""
    draws = np.random.default_rng(seed).integers(0, n_patients, size=(n_resamples, n_patients))
    offsets = (np.arange(n_resamples) * n_patients)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_patients).reshape(n_resamples, n_patients)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) per row of weights (B, m): equals sklearn's ROC AUC.

    Sorting once and summing negative weight below each positive is O(B m) instead of O(B m^2)."""
    order = np.argsort(score, kind="mergesort")
    score, positive, weights = score[order], positive[order].astype(bool), weights[:, order]
    new_value = np.r_[True, score[1:] != score[:-1]]
    group = np.cumsum(new_value) - 1
    starts = np.flatnonzero(new_value)
    ends = np.r_[starts[1:], len(score)]
    neg = weights * ~positive
    cum_neg = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(neg, axis=1)], axis=1)
    below = cum_neg[:, starts[group]]
    tied = cum_neg[:, ends[group]] - below
    pos = weights * positive
    return _ratio((pos * (below + 0.5 * tied)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def weighted_classification(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of benchmark.metrics.classification_metrics, one value per row of weights."""
    labels = np.asarray(labels).astype(int)
    n_classes = probs.shape[1]
    if n_classes == 2:
        auc = weighted_auc(labels == 1, probs[:, 1], weights)
    else:  # macro one-vs-rest: undefined (NaN) when a class is absent, as sklearn refuses it
        auc = np.mean([weighted_auc(labels == k, probs[:, k], weights) for k in range(n_classes)], axis=0)
    pred = probs.argmax(axis=1)
    true_1h = labels[:, None] == np.arange(n_classes)
    pred_1h = pred[:, None] == np.arange(n_classes)
    support = weights @ true_1h
    predicted = weights @ pred_1h
    tp = weights @ (true_1h & pred_1h)
    with np.errstate(invalid="ignore"):
        recall = _ratio(tp, support)
        balanced = np.nanmean(np.where(support > 0, recall, np.nan), axis=1)
    f1 = np.where(support + predicted > 0, 2 * tp / np.where(support + predicted > 0, support + predicted, 1), 0.0)
    return {"auc": auc, "accuracy": _ratio(weights @ (pred == labels), weights.sum(axis=1)),
            "balanced_accuracy": balanced, "macro_f1": f1.mean(axis=1)}


def weighted_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Harrell's C as scikit-survival computes it, one value per row of weights.

    Pair (i, j) is comparable when i had the event and j was seen longer (or censored at i's time);
    concordant when risk_i > risk_j, risk ties (within 1e-8) count one half."""
    time, risk, event = np.asarray(time, float), np.asarray(risk, float), np.asarray(event).astype(bool)
    later = (time[None, :] > time[:, None]) | ((time[None, :] == time[:, None]) & ~event[None, :])
    comparable = (event[:, None] & later).astype(float)
    diff = risk[:, None] - risk[None, :]
    score = comparable * np.where(np.abs(diff) <= TIED_RISK_TOL, 0.5, (diff > 0).astype(float))
    return _ratio(((weights @ score) * weights).sum(axis=1), ((weights @ comparable) * weights).sum(axis=1))


def weighted_metrics(kind: str, rows: pd.DataFrame, weights: np.ndarray) -> dict[str, np.ndarray]:
    if kind == "classification":
        return weighted_classification(rows["label"].to_numpy(), probability_matrix(rows), weights)
    return {"c_index": weighted_c_index(rows["time"], rows["event"], rows["risk"], weights)}


def _patient_codes(rows: pd.DataFrame, patients: np.ndarray) -> np.ndarray:
    return np.searchsorted(patients, rows["patient_id"].to_numpy())


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(kind: str, rows: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> dict[str, Interval]:
    """Per metric: the pooled estimate and its patient-level percentile bootstrap interval."""
    if rows.empty:
        raise ValueError("no pooled predictions to bootstrap; the method has no successful fold")
    patients = np.unique(rows["patient_id"].to_numpy())
    counts = resample_counts(len(patients), n_resamples, seed)
    weights = counts[:, _patient_codes(rows, patients)].astype(float)
    point = weighted_metrics(kind, rows, np.ones((1, len(rows))))
    values = weighted_metrics(kind, rows, weights)
    out = {}
    for name in metric_names(kind):
        valid = values[name][np.isfinite(values[name])]
        out[name] = Interval(float(point[name][0]), *_percentiles(valid, level), len(valid))
    return out


def paired_bootstrap(kind: str, metric: str, rows_a: pd.DataFrame, rows_b: pd.DataFrame,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = LEVEL) -> PairedBootstrap:
    """metric(a) - metric(b) on the patients both scored, each resample drawing the same patients for both."""
    patients = np.intersect1d(rows_a["patient_id"].to_numpy(), rows_b["patient_id"].to_numpy())
    if len(patients) == 0:
        raise ValueError("the two methods scored no patient in common; a paired bootstrap needs the same patients")
    rows_a = rows_a[rows_a["patient_id"].isin(patients)]
    rows_b = rows_b[rows_b["patient_id"].isin(patients)]
    counts = resample_counts(len(patients), n_resamples, seed).astype(float)

    def metric_of(rows: pd.DataFrame, weights: np.ndarray) -> np.ndarray:
        return weighted_metrics(kind, rows, weights[:, _patient_codes(rows, patients)])[metric]

    ones = np.ones((1, len(patients)))
    diff = float(metric_of(rows_a, ones)[0] - metric_of(rows_b, ones)[0])
    diffs = metric_of(rows_a, counts) - metric_of(rows_b, counts)
    diffs = diffs[np.isfinite(diffs)]
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))) if len(diffs) else float("nan")
    return PairedBootstrap(diff, *_percentiles(diffs, level), float(p), len(patients), len(diffs))


def paired_fold_test(a: pd.Series, b: pd.Series) -> FoldComparison:
    """a, b: one metric value per fold (index = fold). Only folds where both have a value are paired."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    d = (both["a"] - both["b"]).to_numpy()
    n = len(d)
    mean_diff = float(d.mean()) if n else float("nan")
    # both tests are undefined with fewer than 2 pairs or when every difference is the same
    t_p = float(scipy_stats.ttest_rel(both["a"], both["b"]).pvalue) if n >= 2 and np.ptp(d) > 0 else float("nan")
    w_p = float(scipy_stats.wilcoxon(both["a"], both["b"]).pvalue) if n >= 2 and np.any(d != 0) else float("nan")
    return FoldComparison(n, mean_diff, t_p, w_p)


def smallest_wilcoxon_p(n_folds: int) -> float:
    """The smallest two-sided exact Wilcoxon signed-rank p-value with n pairs: all signs alike, 2 / 2^n."""
    return 2.0 / 2**n_folds


def risk_groups(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """High/low-risk group per patient, split at each job's training-fold median risk.

    rows: pooled survival predictions with patient_id, time, event, risk, fold, seed and
    train_risk_median (NaN where the method did not report it). A prediction is 'high' when its risk
    is above its job's threshold; a patient with several predictions is high when at least half are.
    Where train_risk_median is missing the job falls back to the median of its own scored risks (not
    a training-set quantity: the returned list names those jobs so callers can warn).
    Returns (one row per patient: patient_id, time, event, high), ['fold F seed S', ...]."""
    own_median = rows.groupby(["fold", "seed"])["risk"].transform("median")
    threshold = rows["train_risk_median"].where(rows["train_risk_median"].notna(), own_median)
    missing = rows.loc[rows["train_risk_median"].isna(), ["fold", "seed"]].drop_duplicates().sort_values(["fold", "seed"])
    calls = rows.assign(high=(rows["risk"] > threshold).astype(float))
    groups = calls.groupby("patient_id", sort=True).agg(time=("time", "first"), event=("event", "first"),
                                                        high=("high", "mean")).reset_index()
    groups["high"] = groups["high"] >= 0.5
    return groups, [f"fold {f} seed {s}" for f, s in missing.itertuples(index=False)]


def logrank(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> LogRank:
    """Log-rank test of high vs low risk through scikit-survival; NaN when a group is empty."""
    high = np.asarray(high).astype(bool)
    if high.all() or not high.any():
        return LogRank(float("nan"), float("nan"))
    y = Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, float))
    chisq, p = compare_survival(y, high)
    return LogRank(float(chisq), float(p))
