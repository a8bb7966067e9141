"""What every cohort adapter returns: slides, patient-level labels per task, and the split protocol."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import pandas as pd

TaskKind = Literal["classification", "survival"]


@dataclass(frozen=True)
class Task:
    """A prediction task. Survival tasks are trained as `n_classes` discrete time bins (4 by convention)."""

    name: str
    kind: TaskKind
    n_classes: int = 2
    class_names: tuple[str, ...] = ()
    description: str = ""

    @property
    def label_columns(self) -> tuple[str, ...]:
        return ("time", "event") if self.kind == "survival" else ("label",)


@dataclass(frozen=True)
class Fold:
    """Patient ids of one cross-validation fold.

    `val` is the fold's held-out partition; `test` an external test set scored by every fold's model
    (CAMELYON16's official test slides). The reported partition is `test` when there is one, else `val`.
    Early stopping, if any, must use an inner split of `train` only.
    """

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()
    source: str = "generated"

    @property
    def reported(self) -> str:
        return "test" if self.test else "val"

    def partitions(self) -> dict[str, tuple[str, ...]]:
        parts = {"train": self.train, "val": self.val}
        if self.test:
            parts["test"] = self.test
        return parts


# (task, n_folds, seed) -> folds, for cohorts that ship their own splits
SplitProvider = Callable[[Task, int, int], list[Fold]]


@dataclass
class Cohort:
    """A set of slides with labels.

    slides: one row per slide: slide_id, patient_id, path (absolute; the file exists).
    labels: per task name, one row per patient: patient_id plus `label` (int class index) for
        classification or `time` (months) and `event` (1 = death observed, 0 = censored) for survival.
    """

    name: str
    slides: pd.DataFrame
    labels: dict[str, pd.DataFrame]
    tasks: dict[str, Task]
    default_task: str
    protocol: str = "patient-level stratified k-fold cross-validation (generated, seeded)"
    split_provider: SplitProvider | None = None
    notes: list[str] = field(default_factory=list)
    tissue_preset: str = "default"  # key of datasets.tissue.TISSUE_PRESETS used to segment its slides

    def tissue_params(self):
        from datasets.tissue import TISSUE_PRESETS

        return TISSUE_PRESETS[self.tissue_preset]

    def task(self, name: str | None = None) -> Task:
        name = name or self.default_task
        if name not in self.tasks:
            raise ValueError(
                f"dataset '{self.name}' has no task '{name}'; its tasks: {', '.join(self.tasks)}"
            )
        return self.tasks[name]

    def samples(self, task: Task) -> pd.DataFrame:
        """One row per patient that has a label for `task` and at least one slide.

        Columns: patient_id, slide_ids (list), paths (list), and the task's label columns.
        A patient with several slides is one sample (its slides are one bag)."""
        grouped = (
            self.slides.sort_values("slide_id")
            .groupby("patient_id", sort=True)
            .agg(slide_ids=("slide_id", list), paths=("path", list))
            .reset_index()
        )
        labels = self.labels[task.name][["patient_id", *task.label_columns]]
        return grouped.merge(labels, on="patient_id", how="inner").reset_index(drop=True)

    def folds(self, task: Task, n_folds: int, seed: int) -> list[Fold]:
        from datasets.splits import audit_folds, generate_folds

        samples = self.samples(task)
        if self.split_provider is not None:
            folds = self.split_provider(task, n_folds, seed)
        else:
            folds = generate_folds(samples, task, n_folds, seed)
        present = samples["patient_id"].tolist()
        audit_folds(folds, present, self.name)
        return [restrict_fold(f, set(present)) for f in folds]


def restrict_fold(fold: Fold, patients: set[str]) -> Fold:
    """The fold without the patients that have no slide (shipped splits list every labelled patient)."""
    keep = lambda ids: tuple(p for p in ids if p in patients)  # noqa: E731
    return Fold(fold.index, keep(fold.train), keep(fold.val), keep(fold.test), fold.source)
