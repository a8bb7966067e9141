"""Patient-level cross-validation splits: generation (seeded, stratified) and the leak audit.

Every split, whatever its source, goes through `audit_folds` before any training."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from datasets.cohorts.base import Fold, Task


class SplitLeakError(ValueError):
    """A split that puts a patient in two partitions of a fold, or leaves a patient out."""


def stratification_labels(samples: pd.DataFrame, task: Task) -> np.ndarray:
    """Classification: the class. Survival: event x survival-time quartile (of all patients)."""
    if task.kind == "classification":
        return samples["label"].to_numpy()
    quartile = pd.qcut(samples["time"].rank(method="first"), 4, labels=False).to_numpy()
    return samples["event"].astype(int).to_numpy() * 4 + quartile


def generate_folds(samples: pd.DataFrame, task: Task, n_folds: int, seed: int) -> list[Fold]:
    """Stratified k-fold over patients (one sample per patient), deterministic by seed."""
    patients = samples["patient_id"].to_numpy()
    if len(set(patients)) != len(patients):
        raise ValueError("generate_folds expects one row per patient")
    strata = stratification_labels(samples, task)
    smallest = min(Counter(strata).values())
    if smallest < n_folds:
        # merge strata too small to reach every fold into the largest one, rather than fail
        counts = Counter(strata)
        largest = counts.most_common(1)[0][0]
        strata = np.array([s if counts[s] >= n_folds else largest for s in strata])
    if len(patients) < n_folds:
        raise ValueError(f"{len(patients)} patients cannot make {n_folds} folds; use --folds {len(patients)} or fewer")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for index, (train_idx, val_idx) in enumerate(splitter.split(patients, strata)):
        folds.append(
            Fold(
                index=index,
                train=tuple(sorted(patients[train_idx])),
                val=tuple(sorted(patients[val_idx])),
                source=f"generated (stratified {n_folds}-fold, seed {seed})",
            )
        )
    return folds


def audit_folds(folds: list[Fold], patients: list[str], cohort: str = "") -> None:
    """Refuse a split in which a patient is in two partitions of one fold, or in none.

    Patients of `patients` that a fold does not mention are a leak of a different kind (they would be
    silently dropped), so they are refused too. Raises SplitLeakError naming the patients."""
    known = set(patients)
    where = f" of {cohort}" if cohort else ""
    for fold in folds:
        parts = fold.partitions()
        seen: dict[str, str] = {}
        overlap: set[str] = set()
        for part, ids in parts.items():
            for pid in ids:
                if pid in seen and seen[pid] != part:
                    overlap.add(pid)
                seen[pid] = part
        if overlap:
            raise SplitLeakError(
                f"fold {fold.index}{where} ({fold.source}) puts {len(overlap)} patients in two partitions: "
                f"{', '.join(sorted(overlap)[:10])}{' ...' if len(overlap) > 10 else ''}; fix the split files or use --splits generate"
            )
        missing = known - set(seen)
        if missing:
            raise SplitLeakError(
                f"fold {fold.index}{where} ({fold.source}) assigns no partition to {len(missing)} patients: "
                f"{', '.join(sorted(missing)[:10])}{' ...' if len(missing) > 10 else ''}; fix the split files or use --splits generate"
            )
