"""The contract between the runner and a method.

A method is built from its registry entry (`METHODS.create(name, **overrides)`) and then:

    method.prepare(cohort, ctx)                          # slide-level products, cached (features, ...)
    out = method.run_fold(cohort, task, fold, seed, ctx)  # train on fold.train, predict the rest

`run_fold` returns predictions for every patient of `fold.val` (and `fold.test` when there is one);
the runner computes the metrics, so every method is scored by the same code.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from datasets.cohorts.base import Cohort, Fold, Task


@dataclass
class RunContext:
    """Where things go and what hardware a job has. One per job (the runner fills it)."""

    out_dir: Path
    cache_dir: Path
    device: str = "cpu"
    max_epochs: int | None = None  # cap on each method's recipe epochs (demo, smoke runs)
    num_workers: int = 0
    strict: bool = False  # first bad slide is fatal
    progress: bool = True
    job_dir: Path | None = None  # scratch folder of the job (checkpoints); kept across restarts
    weights: str | None = None  # --weights: hub | <path> | random (None: the method's default)
    default_mpp: float | None = None


@dataclass
class FoldOutput:
    """What a method returns for one fold.

    predictions: one row per scored patient: patient_id, partition ('val' or 'test'), the task's label
        columns, and `prob_0..prob_{K-1}` (classification) or `risk` (survival; higher = worse).
    info: free-form facts about the fold; survival methods put `train_risk_median` (the median risk of
        the fold's training patients, same scale as `risk`: the leaderboard's Kaplan-Meier split) and
        `timings` (train_s, n_train_slides = slides seen summed over epochs, infer_s, n_infer_slides: the
        cost columns; seconds are device-seconds, wall time x GPUs for a job on several GPUs).
    weights: how the pretrained parts were initialised: 'pretrained:<source>', 'random' (a pretrained
        encoder replaced by random weights: flagged in leaderboards) or 'none' (nothing pretrained).
    """

    predictions: pd.DataFrame
    weights: str
    missing_slides: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Method(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The resolved hyperparameters, as plain data (part of each job's config hash)."""

    def prepare(self, cohort: Cohort, ctx: RunContext) -> None:
        """Build the slide-level products this method needs (cached, idempotent). Default: nothing."""

    @abc.abstractmethod
    def run_fold(self, cohort: Cohort, task: Task, fold: Fold, seed: int, ctx: RunContext) -> FoldOutput:
        """Train on fold.train (inner validation, if any, from fold.train only); predict val/test."""
