"""Patient-level cross-validation splits: generated (seeded, stratified), shipped, or read from
CLAM-style split files; and the leak audit.

`--splits` takes `default` (a cohort's shipped splits where it has them, generated otherwise),
`generate`, or a directory of CLAM-style `splits_{k}.csv` files (columns `train`, `val`, optional
`test`; slide ids or patient ids). Every split, whatever its source, goes through `audit_folds` before
any training (`Cohort.folds` does it)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from datasets.cache import atomic_path
from datasets.cohorts.base import Cohort, Fold, SplitProvider, Task

SPLIT_MODES = ("default", "generate")


class SplitLeakError(ValueError):
    """A split that puts a patient in two partitions of a fold, or leaves a patient out."""


def generate_folds(
    samples: pd.DataFrame, task: Task, n_folds: int, seed: int, test: Sequence[str] = ()
) -> list[Fold]:
    """Stratified k-fold over patients (one sample per patient), deterministic by seed.

    Classification: stratified by class. Survival: stratified by event, and within each event group by
    survival time (each fold gets patients from the whole time range). Every class (or event group)
    and every fold's size differ by at most one patient across folds.
    `test`: patients of an external test set (CAMELYON16's official test slides): kept out of the
    cross-validation and given to every fold as `Fold.test`."""
    test_set = set(test)
    samples = samples[~samples["patient_id"].isin(test_set)].reset_index(drop=True)
    patients = samples["patient_id"].to_numpy()
    if len(set(patients)) != len(patients):
        raise ValueError("generate_folds expects one row per patient")
    if len(patients) < n_folds:
        raise ValueError(f"{len(patients)} patients cannot make {n_folds} folds; use --folds {len(patients)} or fewer")
    assignment = _deal_to_folds(_strata_in_order(samples, task, np.random.default_rng(seed)), n_folds,
                                np.random.default_rng([seed, 1]))
    return [
        Fold(
            index=k,
            train=tuple(sorted(p for p, f in assignment.items() if f != k)),
            val=tuple(sorted(p for p, f in assignment.items() if f == k)),
            test=tuple(sorted(test_set)),
            source=f"generated (stratified {n_folds}-fold, seed {seed})",
        )
        for k in range(n_folds)
    ]


def _strata_in_order(samples: pd.DataFrame, task: Task, rng: np.random.Generator) -> list[list[str]]:
    """Patient ids per stratum (class, or event group), in a seeded random order; survival groups are
    then sorted by time (the random order breaks ties)."""
    shuffled = samples.iloc[rng.permutation(len(samples))]
    key = "label" if task.kind == "classification" else "event"
    strata = []
    for _, group in shuffled.groupby(key, sort=True):
        if task.kind == "survival":
            group = group.sort_values("time", kind="stable")
        strata.append(group["patient_id"].tolist())
    return strata


def _deal_to_folds(strata: list[list[str]], n_folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Deal each stratum in blocks of `n_folds` consecutive patients, one patient of a block per fold
    (random order), and a stratum's last, partial block to the folds that have the fewest patients.

    Hand-written because sklearn's StratifiedKFold balances each stratum on its own but not their
    union: with survival strata of event x time bin, the number of events per fold drifts by several
    patients, and it cannot spread each fold over the time range."""
    totals = np.zeros(n_folds, int)
    assignment = {}
    for ids in strata:
        for start in range(0, len(ids), n_folds):
            block = ids[start : start + n_folds]
            if len(block) == n_folds:
                targets = rng.permutation(n_folds)
            else:  # fewest patients first, random among equals
                targets = np.lexsort((rng.random(n_folds), totals))[: len(block)]
                targets = rng.permutation(targets)
            for patient, fold in zip(block, targets):
                assignment[patient] = int(fold)
                totals[fold] += 1
    return assignment


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


def check_splits_option(splits: str) -> str:
    """`default`, `generate`, or an existing directory; anything else is a user error."""
    if splits in SPLIT_MODES or Path(splits).is_dir():
        return splits
    raise FileNotFoundError(
        f"--splits {splits}: not 'default', 'generate' or a directory of CLAM-style splits_<k>.csv files"
    )


def read_split_dir(directory: Path, slides: pd.DataFrame | None = None, source: str | None = None) -> list[Fold]:
    """Folds from CLAM-style split files `splits_0.csv`, `splits_1.csv`, ... in `directory`.

    Each file has columns `train` and `val` (and optionally `test`) of ids, padded with empty cells;
    a leading index column is ignored. Ids that are slide ids of `slides` become their patient ids
    (CLAM writes slide ids; PORPOISE, MCAT and MambaMIL write patient ids); other ids are kept."""
    directory = Path(directory)
    files = sorted(
        (p for p in directory.glob("splits_*.csv") if re.fullmatch(r"splits_\d+\.csv", p.name)),
        key=lambda p: int(p.stem.split("_")[1]),
    )
    if not files:
        raise FileNotFoundError(f"no splits_<k>.csv files in {directory}; point --splits at a folder of CLAM-style split files")
    to_patient = dict(zip(slides["slide_id"], slides["patient_id"])) if slides is not None else {}
    folds = []
    for index, path in enumerate(files):
        if path.stem != f"splits_{index}":
            raise ValueError(f"split files in {directory} must be numbered splits_0.csv, splits_1.csv, ... without gaps; {path.name} is out of order")
        table = pd.read_csv(path, dtype=str)
        if not {"train", "val"} <= set(table.columns):
            raise ValueError(f"{path} needs columns 'train' and 'val' (CLAM layout), it has {list(table.columns)}")
        parts = {}
        for part in ("train", "val", "test"):
            ids = table[part].dropna().str.strip() if part in table else pd.Series([], dtype=str)
            # a patient with several slides is listed once per slide: keep each patient once per partition
            parts[part] = tuple(dict.fromkeys(to_patient.get(i, i) for i in ids if i))
        folds.append(Fold(index, parts["train"], parts["val"], parts["test"], source or f"split files in {directory}"))
    return folds


def write_split_dir(folds: Sequence[Fold], directory: Path) -> Path:
    """Write folds as CLAM-style `splits_{k}.csv` (patient ids), readable by `read_split_dir`:
    generated splits are saved in the run folder so that a run can be repeated with `--splits DIR`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        columns = {part: pd.Series(ids, dtype=object) for part, ids in fold.partitions().items()}
        table = pd.concat(columns, axis=1)
        with atomic_path(directory / f"splits_{fold.index}.csv") as tmp:
            table.to_csv(tmp)
    return directory


def first_folds(folds: list[Fold], n_folds: int, origin: str) -> list[Fold]:
    """The first `n_folds` of a fixed split (fewer folds run a subset of the published protocol)."""
    if n_folds > len(folds):
        raise ValueError(
            f"{origin} has {len(folds)} folds, {n_folds} were asked for; use --folds {len(folds)} or --splits generate"
        )
    return folds[:n_folds]


def make_split_provider(
    cohort: Cohort,
    splits: str = "default",
    *,
    shipped: Mapping[str, tuple[Path, str]] | None = None,
    test: Sequence[str] = (),
) -> SplitProvider:
    """The `Cohort.split_provider` for a `--splits` choice.

    shipped: task name -> (directory of split files, a name for the leaderboard) for tasks that ship
        published splits; `default` uses them for those tasks and generates folds for the others.
    test: patients of an official external test set, given to every generated fold as `Fold.test`."""
    splits = check_splits_option(splits)
    shipped = dict(shipped or {})

    def provide(task: Task, n_folds: int, seed: int) -> list[Fold]:
        if splits == "generate" or (splits == "default" and task.name not in shipped):
            return generate_folds(cohort.samples(task), task, n_folds, seed, test=test)
        if splits == "default":
            directory, name = shipped[task.name]
            return first_folds(read_split_dir(directory, cohort.slides, source=name), n_folds, name)
        return first_folds(read_split_dir(Path(splits), cohort.slides), n_folds, f"--splits {splits}")

    return provide


def describe_splits(
    splits: str, shipped: Mapping[str, tuple[Path, str]] | None = None, tasks: Sequence[str] = ()
) -> str:
    """One line for the leaderboard header: where the folds of each task come from."""
    shipped = dict(shipped or {})
    generated = "patient-level stratified k-fold cross-validation (generated, seeded)"
    if splits == "generate" or (splits == "default" and not shipped):
        return generated
    if splits == "default":
        parts = [f"{task}: {name}" for task, (_, name) in shipped.items()]
        others = [t for t in tasks if t not in shipped]
        if others:
            parts.append(f"{', '.join(others)}: {generated}")
        return "; ".join(parts)
    return f"patient-level cross-validation from the split files in {splits}"
