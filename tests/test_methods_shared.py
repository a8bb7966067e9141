"""What the methods share: bf16 autocast, the prediction rows of a fold and the training median risk."""
import numpy as np
import pandas as pd
import pytest
import torch

from datasets.cohorts.base import Task
from methods.precision import bf16_autocast
from methods.predictions import prediction_rows, train_risk_median

LABELS = pd.DataFrame({"label": [1, 0, 1], "time": [5.0, 7.5, 2.0], "event": [1, 0, 1]}, index=["p1", "p2", "p3"])


@pytest.mark.parametrize("device, enabled", [("cuda", True), ("cuda:1", True), (torch.device("cuda", 0), True),
                                             ("cpu", False), (torch.device("cpu"), False)])
def test_bf16_autocast_only_on_cuda(device, enabled, monkeypatch):
    made = []
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: made.append((args, kwargs)))
    bf16_autocast(device)
    assert made == [(("cuda",), {"dtype": torch.bfloat16, "enabled": enabled})]


def test_bf16_autocast_leaves_the_cpu_in_float32():
    with bf16_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_runs_matmuls_in_bf16_on_cuda():
    with bf16_autocast("cuda"):
        assert (torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")).dtype == torch.bfloat16


def test_classification_rows_keep_the_columns_and_the_score_dtype():
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    rows = prediction_rows(["p3", "p1"], ["val", "test"], LABELS, Task("t", "classification", 2), probs)
    expected = pd.DataFrame({"patient_id": ["p3", "p1"], "partition": ["val", "test"], "label": [1, 1],
                             "prob_0": np.float32([0.25, 0.5]), "prob_1": np.float32([0.75, 0.5])})
    pd.testing.assert_frame_equal(rows, expected)
    as_float64 = prediction_rows(["p3", "p1"], "val", LABELS, Task("t", "classification", 2), probs.astype(np.float64))
    assert as_float64["prob_1"].dtype == np.float64 and set(as_float64["partition"]) == {"val"}


def test_survival_rows_take_one_risk_per_patient_in_either_shape():
    task = Task("os", "survival", 4)
    rows = prediction_rows(["p2", "p1"], "val", LABELS, task, np.array([[-1.5], [-2.0]]))
    expected = pd.DataFrame({"patient_id": ["p2", "p1"], "partition": ["val", "val"], "time": [7.5, 5.0],
                             "event": [0, 1], "risk": [-1.5, -2.0]})
    pd.testing.assert_frame_equal(rows, expected)
    pd.testing.assert_frame_equal(prediction_rows(["p2", "p1"], "val", LABELS, task, np.array([-1.5, -2.0])), expected)


def test_no_scored_patient_still_gives_the_columns():
    rows = prediction_rows([], "val", LABELS, Task("t", "classification", 2), np.zeros((0,)))
    assert rows.columns.tolist() == ["patient_id", "partition", "label", "prob_0", "prob_1"] and rows.empty


def test_train_risk_median_of_one_risk_per_patient():
    assert train_risk_median(np.array([-3.0, -1.0, -2.0, -0.5])) == -1.5
    assert train_risk_median([np.array([-3.0]), np.array([-1.0]), np.array([-2.0])]) == -2.0  # Pixel-Mamba's (1,) risks
    assert isinstance(train_risk_median(np.float32([-1.0, -2.0])), float)
