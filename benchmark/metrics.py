"""Metrics computed by the runner from each fold's predictions, the same code for every method."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored

CLASSIFICATION_METRICS = ("auc", "accuracy", "balanced_accuracy", "macro_f1")
SURVIVAL_METRICS = ("c_index",)


def probability_matrix(predictions: pd.DataFrame) -> np.ndarray:
    cols = sorted((c for c in predictions.columns if c.startswith("prob_")), key=lambda c: int(c[5:]))
    return predictions[cols].to_numpy(dtype=float)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (binary: of class 1; multi-class: macro one-vs-rest), accuracy, balanced accuracy, macro-F1.

    AUC is NaN when the partition holds a single class."""
    labels = np.asarray(labels).astype(int)
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    if len(np.unique(labels)) < 2:
        auc = float("nan")
    elif n_classes == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    return {
        "auc": float(auc),
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(n_classes)), zero_division=0)),
    }


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index through scikit-survival (ties in risk count one half); NaN when no pair is
    comparable (a small partition with no event before another patient's time, or no event at all)."""
    if not np.asarray(event).astype(bool).any():
        return float("nan")
    try:
        return float(concordance_index_censored(np.asarray(event).astype(bool), np.asarray(time, float),
                                                np.asarray(risk, float))[0])
    except NoComparablePairException:
        return float("nan")


def compute_metrics(kind: str, predictions: pd.DataFrame) -> dict[str, float]:
    if predictions.empty:
        raise ValueError("no predictions to score")
    if kind == "classification":
        return classification_metrics(predictions["label"].to_numpy(), probability_matrix(predictions))
    return {"c_index": c_index(predictions["time"], predictions["event"], predictions["risk"])}


def metric_names(kind: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if kind == "classification" else SURVIVAL_METRICS
