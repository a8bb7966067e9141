"""Folders laid out like real downloads, filled with small synthetic slides under real names.

For tests and smoke runs of the real-cohort adapters end to end without the real data:

    make_tcga_download(dir, "blca")       # like a GDC download: <file uuid>/<slide_id>.svs (+ logs/)
    make_camelyon16_release(dir)          # like the release: training/normal, training/tumor, testing/images

Patients are picked so that every shipped fold has validation patients of each class (CAMELYON16) or
with and without an observed death (TCGA), and the slides carry tumour-like tissue that makes the labels
learnable: CAMELYON16 tumour slides, and TCGA patients who died early, have tumour regions. Each folder
also holds the quirks discovery must cope with (files that are not slides, a slide without a label, and
for CAMELYON16 the excluded test_049 and the old name normal_086 of tumor_111).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from datasets.cohorts.camelyon16 import TABLES as CAMELYON_TABLES
from datasets.cohorts.camelyon16 import camelyon16_labels
from datasets.cohorts.tcga import TABLES as TCGA_TABLES
from datasets.cohorts.tcga import survival_table
from datasets.splits import read_split_dir
from datasets.synthetic import SlidePlan, write_slide

TCGA_MPP = 0.252  # a typical Aperio AT2 40x scan
CAMELYON16_MPP = 0.243  # CAMELYON16's 40x scans (generic TIFF)


@dataclass
class FakeRelease:
    """What a fake download holds: the folder, the patients and slides that should be matched, and the
    slide files that should be reported as unlabelled or left out."""

    root: Path
    patients: list[str]
    slides: list[str]
    unlabelled: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)


def make_tcga_download(
    root: Path,
    cohort: str = "blca",
    *,
    per_fold: int = 4,
    seed: int = 0,
    slide_size: tuple[int, int] = (2048, 1536),
    layout: str = "gdc",
) -> FakeRelease:
    """A TCGA-<cohort> download of `per_fold` patients from each PORPOISE validation fold (half of them
    with an observed death), with all their diagnostic slides, under real slide names.

    layout "gdc": `<file uuid>/<slide_id>.svs` plus a `logs/` folder per file, as the GDC client writes;
    "flat": all slides in `root`. One extra tissue slide (TS1) of a picked patient has no label."""
    if layout not in ("gdc", "flat"):
        raise ValueError(f"layout must be 'gdc' or 'flat', got {layout!r}")
    rng = np.random.default_rng(seed)
    table = survival_table(cohort)
    folds = read_split_dir(TCGA_TABLES / "splits" / "porpoise" / cohort)
    per_patient = table.drop_duplicates("case_id").set_index("case_id")
    patients = []
    for fold in folds:
        val = per_patient.loc[list(fold.val)]
        dead = val[val["censorship"] == 0].sort_values("survival_months")
        alive = val[val["censorship"] == 1].sort_values("survival_months")
        n_dead = per_fold // 2
        # deaths from both ends of the time range, so C-index has comparable pairs in every fold
        patients += _spread(dead.index, n_dead) + _spread(alive.index, per_fold - n_dead)
    rows = table[table["case_id"].isin(patients)]
    short = rows["survival_months"] < rows.loc[rows["censorship"] == 0, "survival_months"].median()
    root = Path(root)
    early_death = (short & (rows["censorship"] == 0)).tolist()
    extra = f"{rows['case_id'].iloc[0]}-01A-01-TS1.{_uuid(rng).upper()}"
    plans = [SlidePlan(r.slide_id, r.case_id, (seed, 1000 + i, 0), 0.5 if early_death[i] else 0.1)
             for i, r in enumerate(rows.itertuples())] + [SlidePlan(extra, "", (seed, 999, 0), 0.0)]
    for plan in plans:
        folder = root / _uuid(rng) if layout == "gdc" else root
        if layout == "gdc":  # the GDC client keeps a transfer log beside each file
            (folder / "logs").mkdir(parents=True, exist_ok=True)
            (folder / "logs" / f"{plan.slide_id}.svs.parcel").write_text("")
        write_slide(folder / f"{plan.slide_id}.svs", plan, slide_size, mpp=TCGA_MPP, aperio=True)
    return FakeRelease(root, sorted(set(patients)), sorted(rows["slide_id"]), unlabelled=[extra])


def make_camelyon16_release(
    root: Path,
    *,
    per_fold: tuple[int, int] = (2, 2),
    n_test: tuple[int, int] = (5, 5),
    seed: int = 0,
    slide_size: tuple[int, int] = (2048, 1536),
    layout: str = "official",
    quirks: bool = True,
) -> FakeRelease:
    """A CAMELYON16 release with `per_fold` (normal, tumour) training slides from each MS-CLAM validation
    fold and `n_test` (normal, tumour) official test slides, under their real names.

    layout "official": training/normal, training/tumor, testing/images; "flat": all in `root`.
    quirks: tumor_111 is written under its old name normal_086, the excluded duplicate test_049 is
    present, and a lesion mask and an annotation XML lie beside the slides."""
    if layout not in ("official", "flat"):
        raise ValueError(f"layout must be 'official' or 'flat', got {layout!r}")
    labels = camelyon16_labels().set_index("slide_id")
    picked = []
    for fold in read_split_dir(CAMELYON_TABLES / "folds" / "msclam"):
        val = labels.loc[list(fold.val)]
        for label, n in enumerate(per_fold):
            ids = sorted(val.index[val["label"] == label])
            if quirks and label == 1 and "tumor_111" in ids:
                ids.remove("tumor_111")
                ids.insert(0, "tumor_111")
            picked += ids[:n]
    test = labels[labels["split"] == "test"]
    for label, n in enumerate(n_test):
        picked += sorted(test.index[test["label"] == label])[:n]
    root = Path(root)
    release = FakeRelease(root, sorted(picked), sorted(picked))
    for i, slide_id in enumerate(picked):
        name = slide_id
        if quirks and slide_id == "tumor_111":
            name = "normal_086"
            release.renamed[name] = slide_id
        burden = 0.3 if labels.loc[slide_id, "label"] == 1 else 0.0
        plan = SlidePlan(slide_id, slide_id, (seed, 2000 + i, 0), burden)
        write_slide(_camelyon_folder(root, name, layout) / f"{name}.tif", plan, slide_size, mpp=CAMELYON16_MPP)
    if quirks:
        plan = SlidePlan("test_049", "test_049", (seed, 2999, 0), 0.3)
        write_slide(_camelyon_folder(root, "test_049", layout) / "test_049.tif", plan, slide_size, mpp=CAMELYON16_MPP)
        release.excluded.append("test_049")
        tumour = next(s for s in picked if s.startswith("tumor_"))
        official = layout == "official"
        mask = root / ("training/masks" if official else "") / f"{tumour}_mask.tif"
        mask.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(mask, np.zeros((64, 64), np.uint8), tile=(16, 16))
        xml = root / ("training/lesion_annotations" if official else "") / f"{tumour}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text("<ASAP_Annotations><Annotations /></ASAP_Annotations>\n")
    return release


def _camelyon_folder(root: Path, name: str, layout: str) -> Path:
    if layout == "flat":
        return root
    return root / {"normal": "training/normal", "tumor": "training/tumor", "test": "testing/images"}[name.split("_")[0]]


def _spread(ids: pd.Index, n: int) -> list[str]:
    """`n` ids evenly spread over an ordered index (first, last, and between)."""
    if n <= 0 or len(ids) == 0:
        return []
    positions = np.unique(np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int))
    return [ids[p] for p in positions]


def _uuid(rng: np.random.Generator) -> str:
    """A random (version 4) UUID from the seeded generator, as GDC file ids and TCGA slide names use."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))
