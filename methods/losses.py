"""Task losses shared by every method, so that their numbers compare.

Survival follows MCAT / PORPOISE / MambaMIL (shared BASELINES.md section 4): 4 discrete time bins from
the quartiles of the *uncensored* training patients, hazards h = sigmoid(logits), S = cumprod(1 - h),
negative log-likelihood with censoring, risk = -sum(S).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from datasets.cohorts.base import Task

EPS = 1e-7


def survival_bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Bin edges from quantiles of the uncensored times; the outer edges cover every patient."""
    times = np.asarray(times, dtype=float)
    uncensored = times[np.asarray(events).astype(bool)]
    if len(uncensored) < n_bins:
        raise ValueError(
            f"only {len(uncensored)} uncensored training patients: too few for {n_bins} survival bins"
        )
    edges = np.quantile(uncensored, np.linspace(0, 1, n_bins + 1))
    edges[0] = min(times.min(), edges[0]) - EPS
    edges[-1] = max(times.max(), edges[-1]) + EPS
    return edges


def survival_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index in [0, n_bins) of each time; times past the outer edges fall in the end bins."""
    inner = np.asarray(edges)[1:-1]
    return np.searchsorted(inner, np.asarray(times, dtype=float), side="right")


def loss_targets(samples: pd.DataFrame, task: Task,
                 train_patients: Iterable[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list[float] | None]:
    """What `task_loss` takes for each patient of `samples` (indexed by patient_id), as 0-d tensors:
    the label, or the survival bin and censoring (1 = no event). The bin edges come from
    `train_patients` only (the fold's training patients), so that no held-out time shapes the bins;
    they are returned too (None for classification) for the fold's info."""
    if task.kind == "classification":
        return {p: {"label": torch.tensor(int(v))} for p, v in samples["label"].items()}, None
    train = samples.loc[list(train_patients)]
    edges = survival_bin_edges(train["time"].to_numpy(), train["event"].to_numpy(), n_bins=task.n_classes)
    bins = survival_bins(samples["time"].to_numpy(), edges)
    targets = {p: {"bin": torch.tensor(int(b)), "censored": torch.tensor(1.0 - float(e))}
               for p, b, e in zip(samples.index, bins, samples["event"])}
    return targets, edges.tolist()


def nll_survival_loss(logits: torch.Tensor, y: torch.Tensor, censored: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Discrete-time survival NLL, averaged over the batch.

    logits: (B, n_bins); y: (B,) bin index; censored: (B,) 1 = censored (no event observed)."""
    y = y.long().view(-1, 1)
    c = censored.float().view(-1, 1)
    hazards = torch.sigmoid(logits.float())
    surv = torch.cumprod(1 - hazards, dim=1)
    surv_pad = torch.cat([torch.ones_like(c), surv], dim=1)
    s_prev = torch.gather(surv_pad, 1, y).clamp(min=EPS)
    h_this = torch.gather(hazards, 1, y).clamp(min=EPS)
    s_this = torch.gather(surv_pad, 1, y + 1).clamp(min=EPS)
    uncensored_loss = -(1 - c) * (torch.log(s_prev) + torch.log(h_this))
    censored_loss = -c * torch.log(s_this)
    loss = (1 - alpha) * (uncensored_loss + censored_loss) + alpha * uncensored_loss
    return loss.mean()


def survival_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score: -sum of the survival function (higher = earlier death)."""
    return -torch.cumprod(1 - torch.sigmoid(logits.float()), dim=1).sum(dim=1)


def task_loss(kind: str, logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy for classification; the survival NLL for survival (target: bin, censored)."""
    if kind == "classification":
        return F.cross_entropy(logits, target["label"].long())
    return nll_survival_loss(logits, target["bin"], target["censored"])
