"""The `synthetic` cohort: generated on first use (datasets/synthetic.py), then read from disk."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.registry import DATASETS
from datasets.cohorts.base import Cohort, Task

DEFAULT_PATIENTS = 40
DEFAULT_SLIDE_SIZE = (4096, 3072)

TASKS = {
    "metastasis": Task("metastasis", "classification", 2, ("normal", "tumour"),
                       "does any of the patient's slides hold tumour-like tissue"),
    "stage": Task("stage", "classification", 3, ("none", "small", "large"), "tumour burden: none / small / large"),
    "survival": Task("survival", "survival", 4, (), "overall survival, hazard growing with tumour burden"),
}


def synthetic_root(
    data_root: Path | None, cache_dir: Path, seed: int, n_patients: int, slide_size: tuple[int, int]
) -> Path:
    """`data_root` if given, else `<cache_dir>/synthetic/seed<seed>` (plus the sizes if not the defaults)."""
    if data_root is not None:
        return Path(data_root)
    suffix = "" if n_patients == DEFAULT_PATIENTS else f"_n{n_patients}"
    suffix += "" if tuple(slide_size) == DEFAULT_SLIDE_SIZE else f"_{slide_size[0]}x{slide_size[1]}"
    return Path(cache_dir) / "synthetic" / f"seed{seed}{suffix}"


@DATASETS.register(
    "synthetic",
    "built-in synthetic H&E-like cohort (generated on first use): metastasis, stage (tumour burden), survival",
)
def synthetic(
    data_root: Path | None,
    cache_dir: Path,
    seed: int = 0,
    splits: str = "default",
    n_patients: int = DEFAULT_PATIENTS,
    slide_size: tuple[int, int] = DEFAULT_SLIDE_SIZE,
    progress: bool = True,
) -> Cohort:
    """The synthetic cohort of `seed`, generated on first use (with a progress bar unless `progress` is
    False); smaller `n_patients`/`slide_size` for tests."""
    from datasets.splits import describe_splits, make_split_provider
    from datasets.synthetic import generate_synthetic_cohort, read_labels

    root = generate_synthetic_cohort(
        synthetic_root(data_root, cache_dir, seed, n_patients, slide_size), seed, n_patients,
        slide_size=slide_size, progress=progress,
    )
    table = read_labels(root)
    slides = table[["slide_id", "patient_id"]].assign(
        path=[str((root / "slides" / f"{s}.tiff").resolve()) for s in table["slide_id"]]
    )
    patients = table.drop_duplicates("patient_id").sort_values("patient_id").reset_index(drop=True)
    labels = {
        "metastasis": patients[["patient_id"]].assign(label=patients["metastasis"].astype(int)),
        "stage": patients[["patient_id"]].assign(label=patients["stage"].astype(int)),
        "survival": patients[["patient_id", "time", "event"]].astype({"event": int}),
    }
    cohort = Cohort(
        name="synthetic",
        slides=slides.reset_index(drop=True),
        labels=labels,
        tasks=dict(TASKS),
        default_task="metastasis",
        protocol=describe_splits(splits),
        notes=[_summary(table, root)],
        tissue_preset="synthetic",
    )
    cohort.split_provider = make_split_provider(cohort, splits)
    return cohort


def _summary(table: pd.DataFrame, root: Path) -> str:
    patients = table.drop_duplicates("patient_id")
    two = int((table.groupby("patient_id").size() > 1).sum())
    return (
        f"synthetic cohort in {root}: {len(table)} slides, {len(patients)} patients "
        f"({int(patients['metastasis'].sum())} with tumour, {two} with two slides, "
        f"{100 * (1 - patients['event'].mean()):.0f}% censored)"
    )
