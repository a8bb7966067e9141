"""CAMELYON16 (`camelyon16`): lymph-node slides, normal vs tumour (metastasis), with the paper's protocol:
5-fold cross-validation over the 270 official training slides, every fold's model scored on the official
129-slide test set (`Fold.test`). One slide = one sample (the release has no patient ids).

Default folds: MS-CLAM's shipped 5 folds; `--splits generate` makes stratified folds of the training
slides, still with the official test set. Slides are matched by name (case-insensitive) anywhere under
`--data-root`; test_049 (a duplicate the organizers removed) is left out, and a `normal_086` file, the
name tumor_111 had before the organizers relabelled it, is used as tumor_111.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmark.registry import DATASETS
from datasets.cohorts.base import Cohort, Task
from datasets.cohorts.discovery import find_slides, match_slides

TABLES = Path(__file__).resolve().parents[1] / "tables" / "camelyon16"
MSCLAM = "MS-CLAM 5-fold splits of the 270 training slides (Tourniaire et al. 2023), official test set"
RENAMED = {"normal_086": "tumor_111"}

METASTASIS = Task("metastasis", "classification", 2, ("normal", "tumour"), "lymph-node metastasis, slide level")


def camelyon16_labels() -> pd.DataFrame:
    """The shipped labels: slide_id, split (official train/test), label (0 normal, 1 tumour), ..."""
    return pd.read_csv(TABLES / "labels.csv", dtype={"slide_id": str})


def excluded_slides() -> dict[str, str]:
    """Slides that must not be used although a release may contain them: slide_id -> reason.
    normal_086 is in the table only as the old name of tumor_111 (handled as a rename)."""
    table = pd.read_csv(TABLES / "excluded_slides.csv", dtype=str)
    return {s: r for s, r in zip(table["slide_id"], table["reason"]) if s not in RENAMED}


@DATASETS.register(
    "camelyon16",
    "CAMELYON16 lymph-node slides (--data-root): metastasis; 5-fold CV on the 270 training slides, official test set",
)
def camelyon16(data_root: Path | None, cache_dir: Path, seed: int = 0, splits: str = "default") -> Cohort:
    from datasets.splits import check_splits_option, describe_splits, make_split_provider

    if data_root is None:
        raise ValueError("camelyon16 needs --data-root: the folder with the CAMELYON16 .tif slides "
                         "(official training/ and testing/ layout or flat)")
    check_splits_option(splits)
    table = camelyon16_labels()
    expected = table.assign(patient_id=table["slide_id"])[["slide_id", "patient_id"]]
    coverage = match_slides(find_slides(data_root), expected, data_root, key=str.lower,
                            renamed=RENAMED, excluded=excluded_slides())
    if coverage.matched.empty:
        raise FileNotFoundError(
            f"none of the 399 CAMELYON16 slides is under {data_root} ({coverage.n_found} slide files scanned); "
            "slides are matched by name: normal_001.tif, tumor_001.tif, test_001.tif, ..."
        )
    present = set(coverage.matched["slide_id"])
    notes = coverage.lines("camelyon16", len(table))
    for split in ("train", "test"):
        part = table[table["split"] == split]
        here = part[part["slide_id"].isin(present)]
        notes.append(f"official {split} set: {len(here)} of {len(part)} slides on disk "
                     f"({int((here['label'] == 0).sum())} normal, {int((here['label'] == 1).sum())} tumour)")
    shipped = {"metastasis": (TABLES / "folds" / "msclam", MSCLAM)}
    cohort = Cohort(
        name="camelyon16",
        slides=coverage.matched,
        labels={"metastasis": table.rename(columns={"slide_id": "patient_id"})[["patient_id", "label"]]},
        tasks={"metastasis": METASTASIS},
        default_task="metastasis",
        protocol=describe_splits(splits, shipped, ["metastasis"]) + "; every fold scored on the official test set",
        notes=notes,
    )
    test = table.loc[table["split"] == "test", "slide_id"].tolist()
    cohort.split_provider = make_split_provider(cohort, splits, shipped=shipped, test=test)
    return cohort
