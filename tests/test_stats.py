"""Leaderboard statistics against independent computations: explicit resampling loops scored by
sklearn / scikit-survival, hand formulas for the t-test, Wilcoxon and log-rank tests."""
import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score
from sksurv.compare import compare_survival
from sksurv.util import Surv

from benchmark import stats
from benchmark.metrics import compute_metrics

B = 100  # resamples in tests: enough to compare every percentile, quick for the explicit loops


def classification_rows(n=40, n_classes=2, seed=0, repeats=1):
    """Patients P00.. with labels and rounded probabilities (ties); `repeats` rows per patient, as when
    every fold's model scores a shared test set."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    frames = []
    for r in range(repeats):
        logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        probs = probs.round(2)
        probs[:, -1] = 1 - probs[:, :-1].sum(1)
        frame = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "label": labels, "fold": r, "seed": 0})
        for k in range(n_classes):
            frame[f"prob_{k}"] = probs[:, k]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def survival_rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 30, n).astype(float)  # integer times: tied times
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "time": time,
                         "event": (rng.uniform(size=n) < 0.6).astype(int),
                         "risk": (-time / 10 + rng.normal(size=n)).round(1)})  # rounded: tied risks


def explicit_resamples(rows, n_resamples, seed):
    """The generator contract written out: draw patient indices, concatenate the drawn patients' rows."""
    patients = np.sort(rows["patient_id"].unique())
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(n_resamples, len(patients)))
    row_ids = [np.flatnonzero(rows["patient_id"].to_numpy() == p) for p in patients]
    for d in draws:
        yield rows.iloc[np.concatenate([row_ids[i] for i in d])]


def explicit_bootstrap(kind, rows, n_resamples=B, seed=3):
    """metric -> (2.5th and 97.5th percentiles, number of resamples where the metric is defined)."""
    values = {}
    for sample in explicit_resamples(rows, n_resamples, seed):
        for name, value in compute_metrics(kind, sample).items():
            values.setdefault(name, [])
            if np.isfinite(value):
                values[name].append(value)
    return {name: (np.percentile(v, [2.5, 97.5]), len(v)) for name, v in values.items()}


def test_resample_counts_follow_the_generator_contract():
    counts = stats.resample_counts(7, n_resamples=5, seed=11)
    draws = np.random.default_rng(11).integers(0, 7, size=(5, 7))
    assert counts.tolist() == [np.bincount(d, minlength=7).tolist() for d in draws]


@pytest.mark.parametrize("n_classes,repeats", [(2, 1), (3, 1), (2, 3)])
def test_bootstrap_ci_equals_explicit_resampling(n_classes, repeats):
    rows = classification_rows(n=45, n_classes=n_classes, repeats=repeats)
    intervals = stats.bootstrap_ci("classification", rows, n_resamples=B, seed=3)
    full = compute_metrics("classification", rows)
    explicit = explicit_bootstrap("classification", rows)
    for metric, interval in intervals.items():
        (low, high), n_valid = explicit[metric]
        assert interval.estimate == pytest.approx(full[metric], abs=1e-12)
        assert (interval.low, interval.high) == pytest.approx((low, high), abs=1e-12)
        assert interval.n_valid == n_valid


def test_bootstrap_ci_of_c_index_equals_explicit_resampling():
    rows = survival_rows()
    interval = stats.bootstrap_ci("survival", rows, n_resamples=B, seed=3)["c_index"]
    (low, high), n_valid = explicit_bootstrap("survival", rows)["c_index"]
    assert interval.estimate == pytest.approx(compute_metrics("survival", rows)["c_index"], abs=1e-12)
    assert (interval.low, interval.high, interval.n_valid) == pytest.approx((low, high, n_valid), abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_bootstrap_drops_resamples_where_auc_is_undefined():
    rows = classification_rows(n=6)  # 3 + 3 patients: some resamples draw a single class
    interval = stats.bootstrap_ci("classification", rows, n_resamples=B, seed=3)["auc"]
    _, n_valid = explicit_bootstrap("classification", rows)["auc"]
    assert interval.n_valid == n_valid < B


def test_paired_bootstrap_draws_the_same_patients_for_both_methods():
    a = classification_rows(n=40, seed=1)
    b = classification_rows(n=40, seed=2)
    b = b[b["patient_id"] != "P05"]  # b did not score one patient: only common patients are compared
    result = stats.paired_bootstrap("classification", "auc", a, b, n_resamples=B, seed=3)
    common = a[a["patient_id"] != "P05"]
    diffs = []
    for sample_a, sample_b in zip(explicit_resamples(common, B, 3), explicit_resamples(b, B, 3)):
        assert sample_a["patient_id"].tolist() == sample_b["patient_id"].tolist()
        diffs.append(roc_auc_score(sample_a["label"], sample_a["prob_1"]) - roc_auc_score(sample_b["label"], sample_b["prob_1"]))
    diffs = np.array(diffs)
    expected_p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    full = compute_metrics("classification", common)["auc"] - compute_metrics("classification", b)["auc"]
    assert result.n_patients == 39 and result.diff == pytest.approx(full, abs=1e-12)
    assert (result.low, result.high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    assert result.p == pytest.approx(expected_p)


def test_paired_bootstrap_refuses_methods_without_common_patients():
    a = classification_rows(n=10)
    b = a.assign(patient_id=a["patient_id"] + "x")
    with pytest.raises(ValueError, match="no patient in common"):
        stats.paired_bootstrap("classification", "auc", a, b)


def hand_wilcoxon_exact(d):
    """Two-sided exact signed-rank p: share of the 2^n sign patterns whose smaller rank sum is as small."""
    ranks = scipy_stats.rankdata(np.abs(d))
    observed = min(ranks[d > 0].sum(), ranks[d < 0].sum())
    hits = [min(sum(r for r, s in zip(ranks, signs) if s), sum(r for r, s in zip(ranks, signs) if not s)) <= observed
            for signs in itertools.product([True, False], repeat=len(d))]
    return np.mean(hits)


def test_paired_fold_test_matches_hand_formulas():
    a = pd.Series([0.81, 0.77, 0.90, 0.85, 0.79, 0.70], index=[0, 1, 2, 3, 4, 5])
    b = pd.Series([0.78, 0.70, 0.86, 0.87, 0.72], index=[0, 1, 2, 3, 4])  # fold 5 missing for b: not paired
    result = stats.paired_fold_test(a, b)
    d = a.loc[b.index].to_numpy() - b.to_numpy()
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert result.n_folds == 5 and result.mean_diff == pytest.approx(d.mean())
    assert result.t_p == pytest.approx(2 * scipy_stats.t.sf(abs(t), df=len(d) - 1))
    assert result.wilcoxon_p == pytest.approx(hand_wilcoxon_exact(d))


def test_paired_fold_test_undefined_cases_and_wilcoxon_floor():
    same = pd.Series([0.8, 0.7, 0.9])
    r = stats.paired_fold_test(same, same)
    assert np.isnan(r.t_p) and np.isnan(r.wilcoxon_p) and r.mean_diff == 0
    shifted = stats.paired_fold_test(same + 0.1, same)  # constant difference: t undefined
    assert np.isnan(shifted.t_p)
    # five folds all in one direction: the smallest two-sided exact Wilcoxon p, still above 0.05
    five = stats.paired_fold_test(pd.Series([0.9, 0.8, 0.85, 0.95, 0.7]), pd.Series([0.8, 0.75, 0.6, 0.9, 0.5]))
    assert five.wilcoxon_p == pytest.approx(stats.smallest_wilcoxon_p(5)) == pytest.approx(0.0625)


def hand_logrank(time, event, group):
    """Two-group log-rank chi-square written from its definition (observed - expected in group 1)."""
    o_minus_e = var = 0.0
    for t in np.unique(time[event == 1]):
        at_risk = time >= t
        n, n1 = at_risk.sum(), (at_risk & group).sum()
        d = ((time == t) & (event == 1)).sum()
        d1 = ((time == t) & (event == 1) & group).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    chisq = o_minus_e**2 / var
    return chisq, scipy_stats.chi2.sf(chisq, df=1)


def test_logrank_equals_scikit_survival_and_hand_chi_square():
    rows = survival_rows(n=50, seed=4)
    high = (rows["risk"] > rows["risk"].median()).to_numpy()
    result = stats.logrank(rows["time"], rows["event"], high)
    y = Surv.from_arrays(event=rows["event"].astype(bool), time=rows["time"])
    chisq, p = compare_survival(y, high)
    assert (result.chisq, result.p) == pytest.approx((chisq, p), rel=1e-10)
    assert (result.chisq, result.p) == pytest.approx(hand_logrank(rows["time"].to_numpy(), rows["event"].to_numpy(), high),
                                                     rel=1e-10)
    assert np.isnan(stats.logrank(rows["time"], rows["event"], np.ones(len(rows), bool)).p)


def test_risk_groups_split_at_training_median_not_at_scored_median():
    # fold 0's scored risks have median 0.5, its training median is 0.15: P01 (0.2) is high only by the latter
    rows = pd.DataFrame({
        "patient_id": ["P00", "P01", "P02", "P03", "P10", "P11", "P12", "P13"],
        "time": [5.0, 6, 7, 8, 9, 10, 11, 12], "event": [1, 1, 0, 1, 1, 0, 1, 1],
        "risk": [0.1, 0.2, 0.8, 0.9, 3.0, 4.0, 5.0, 6.0],
        "fold": [0, 0, 0, 0, 1, 1, 1, 1], "seed": 0,
        "train_risk_median": [0.15] * 4 + [5.5] * 4,  # fold 1: only P13 is above its training median
    })
    groups, fallback = stats.risk_groups(rows)
    assert fallback == []
    assert groups.set_index("patient_id")["high"].to_dict() == {
        "P00": False, "P01": True, "P02": True, "P03": True, "P10": False, "P11": False, "P12": False, "P13": True}
    # a job without the training median falls back to its own median and is named
    rows.loc[rows["fold"] == 1, "train_risk_median"] = np.nan
    groups, fallback = stats.risk_groups(rows)
    assert fallback == ["fold 1 seed 0"]
    assert groups.set_index("patient_id")["high"].to_dict()["P12"]  # above fold 1's own median 4.5


def test_risk_groups_majority_over_a_patients_predictions():
    rows = pd.DataFrame({"patient_id": ["A", "A", "A", "B", "B", "B"], "time": [3.0] * 3 + [4.0] * 3,
                         "event": [1] * 6, "risk": [1.0, 1.0, -1.0, -1.0, -1.0, 1.0],
                         "fold": [0, 1, 2, 0, 1, 2], "seed": 0, "train_risk_median": 0.0})
    groups, _ = stats.risk_groups(rows)
    assert groups["high"].tolist() == [True, False]
