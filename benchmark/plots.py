"""Pictures beside the leaderboards (PNG, headless): ROC curves, Kaplan-Meier curves, C-index per fold.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg) rather
than pyplot: no global backend switch, no display needed, and no figure left open in a registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from sksurv.nonparametric import kaplan_meier_estimator

from benchmark.metrics import probability_matrix
from benchmark.stats import LogRank

FPR_GRID = np.linspace(0, 1, 201)
DPI = 100


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    return path


def one_vs_rest(rows: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """(is class k, score of class k) per class; binary tasks give the single pair of class 1."""
    labels = rows["label"].to_numpy().astype(int)
    probs = probability_matrix(rows)
    if probs.shape[1] == 2:
        return [(labels == 1, probs[:, 1])]
    return [(labels == k, probs[:, k]) for k in range(probs.shape[1])]


def macro_roc(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """Mean TPR over classes on a common FPR grid (the macro-average curve); None if a class is absent."""
    curves = []
    for truth, score in pairs:
        if truth.all() or not truth.any():
            return None
        fpr, tpr, _ = roc_curve(truth, score)
        curves.append(np.interp(FPR_GRID, fpr, tpr))
    return np.mean(curves, axis=0)


def _chance_line(ax) -> None:
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_aspect("equal")


def roc_figure(method: str, rows: pd.DataFrame, path: Path) -> Path:
    """One method: faint ROC per job (fold, seed), bold ROC of the predictions of all jobs pooled.

    Multi-class tasks: per-class one-vs-rest pooled curves plus the macro-average (bold, black); the
    faint job curves are macro-averages too."""
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.add_subplot()
    _chance_line(ax)
    pairs = one_vs_rest(rows)
    binary = len(pairs) == 1
    fold_label = "folds" if binary else "folds (macro average)"
    for i, (_, job) in enumerate(rows.groupby(["fold", "seed"])):
        curve = macro_roc(one_vs_rest(job))
        if curve is not None:
            ax.plot(FPR_GRID, curve, color="tab:blue" if binary else "grey", alpha=0.3, lw=1,
                    label=fold_label if i == 0 else None)
    pooled = macro_roc(pairs)
    if pooled is None:
        ax.text(0.5, 0.5, "pooled ROC undefined:\na class is absent", ha="center", va="center", color="red")
    elif binary:
        fpr, tpr, _ = roc_curve(*pairs[0])
        ax.plot(fpr, tpr, color="tab:blue", lw=2.2, label=f"pooled (AUC {roc_auc_score(*pairs[0]):.3f})")
    else:
        for k, (truth, score) in enumerate(pairs):
            fpr, tpr, _ = roc_curve(truth, score)
            ax.plot(fpr, tpr, lw=1.2, label=f"class {k} vs rest (AUC {roc_auc_score(truth, score):.3f})")
        macro_auc = np.mean([roc_auc_score(t, s) for t, s in pairs])
        ax.plot(FPR_GRID, pooled, color="black", lw=2.2, label=f"macro average (AUC {macro_auc:.3f})")
    ax.set_title(f"{method}: ROC, predictions of all folds pooled", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def roc_overlay(pooled: dict[str, pd.DataFrame], path: Path) -> Path:
    """The pooled (macro-average for multi-class) ROC of every method on one axes."""
    fig = Figure(figsize=(5.2, 5.2))
    ax = fig.add_subplot()
    _chance_line(ax)
    for method, rows in pooled.items():
        pairs = one_vs_rest(rows)
        curve = macro_roc(pairs)
        if curve is not None:
            auc = np.mean([roc_auc_score(t, s) for t, s in pairs])
            ax.plot(FPR_GRID, curve, lw=1.6, label=f"{method} (pooled AUC {auc:.3f})")
    multi = any(len(one_vs_rest(rows)) > 1 for rows in pooled.values())
    ax.set_title("ROC of every method, predictions of all folds pooled" + ("\n(macro average over classes)" if multi else ""),
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def km_figure(method: str, groups: pd.DataFrame, test: LogRank, fallback_jobs: list[str], path: Path) -> Path:
    """Kaplan-Meier curves (95% log-log band) of the high- and low-risk patients of one method.

    groups: one row per patient with time, event and high (see benchmark.stats.risk_groups)."""
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.add_subplot()
    for high, name, colour in ((True, "high risk", "tab:red"), (False, "low risk", "tab:blue")):
        part = groups[groups["high"] == high]
        if part.empty:
            continue
        t, s, (lo, hi) = kaplan_meier_estimator(part["event"].to_numpy().astype(bool), part["time"].to_numpy(float),
                                                conf_type="log-log")
        t, s, lo, hi = np.r_[0.0, t], np.r_[1.0, s], np.r_[1.0, lo], np.r_[1.0, hi]  # every curve starts at S(0) = 1
        ax.step(t, s, where="post", color=colour, lw=1.8, label=f"{name} (n={len(part)})")
        ax.fill_between(t, lo, hi, step="post", color=colour, alpha=0.15)
        censored = part.loc[part["event"] == 0, "time"].to_numpy(float)
        ax.plot(censored, s[np.searchsorted(t, censored, side="right") - 1], "|", color=colour, ms=7)
    p = "undefined (a group is empty)" if np.isnan(test.p) else f"{test.p:.3g}"
    ax.set(ylim=(0, 1.02), xlabel="Time", ylabel="Survival probability")
    ax.set_title(f"{method}: high vs low risk; log-rank p = {p}", fontsize=10)
    if fallback_jobs:
        ax.text(0.02, 0.03, "WARNING: no train_risk_median in the results;\nsplit at each fold's own median risk",
                transform=ax.transAxes, color="red", fontsize=8, va="bottom")
    ax.legend(loc="upper right", fontsize=8)
    return save(fig, path)


def c_index_strip(per_job: pd.DataFrame, order: list[str], path: Path) -> Path:
    """C-index of every job (fold, seed) per method, with the mean over folds as a bar."""
    fig = Figure(figsize=(1.2 + 1.1 * len(order), 4.2))
    ax = fig.add_subplot()
    jitter = np.random.default_rng(0)  # fixed: the picture is the same on every rebuild
    for x, method in enumerate(order):
        values = per_job.loc[per_job["method"] == method, "c_index"].dropna().to_numpy(float)
        ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=22, color="tab:blue", alpha=0.8)
        if len(values):
            ax.hlines(values.mean(), x - 0.25, x + 0.25, color="black", lw=2)
    ax.axhline(0.5, ls=":", color="grey", lw=1)
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="C-index", xlim=(-0.6, len(order) - 0.4))
    ax.set_title("C-index per fold (bar: mean)", fontsize=10)
    return save(fig, path)
