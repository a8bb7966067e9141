"""A fold's outputs that every method writes alike: its prediction rows and, for survival, the median
training risk. The runner checks them and the leaderboards read them, so their columns are a contract."""
from __future__ import annotations

import numpy as np
import pandas as pd

from datasets.cohorts.base import Task


def prediction_rows(patient_ids: list[str], partitions: str | list[str], samples: pd.DataFrame, task: Task,
                    scores: np.ndarray) -> pd.DataFrame:
    """One row per scored patient: patient_id, partition, the task's label columns (from `samples`,
    indexed by patient_id), then prob_<k> per class (classification; scores (n, n_classes)) or risk
    (survival; one score per patient). The scores keep their dtype: the caller decides it."""
    rows = pd.DataFrame({"patient_id": patient_ids, "partition": partitions})
    for column in task.label_columns:
        rows[column] = samples.loc[rows["patient_id"], column].to_numpy()
    scores = np.asarray(scores)
    if task.kind == "survival":
        rows["risk"] = scores.reshape(len(rows))
    else:
        probs = scores.reshape(len(rows), task.n_classes)
        for k in range(task.n_classes):
            rows[f"prob_{k}"] = probs[:, k]
    return rows


def train_risk_median(train_risks) -> float:
    """info['train_risk_median'], the leaderboard's Kaplan-Meier split: the median risk the trained model
    gives the fold's training patients (one risk each), so that the split never looks at the reported
    partition."""
    return float(np.median(np.ravel(train_risks)))
