"""The shipped tables load with the counts their provenance states, byte for byte the collected copies."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from datasets.cohorts.camelyon16 import camelyon16_labels, excluded_slides
from datasets.cohorts.tcga import NO_STAGE, TABLES, TCGA_COHORTS, stage_labels, stage_to_class, survival_table
from datasets.splits import audit_folds, read_split_dir

# PROVENANCE.md section 1: rows (slides), patients, max slides per patient, censored % of patients
SURVIVAL_COUNTS = {
    "blca": (437, 373, 9, 54.7), "brca": (1022, 956, 4, 86.4), "coadread": (345, 340, 3, 76.2),
    "gbmlgg": (1011, 569, 17, 67.1), "hnsc": (437, 416, 4, 52.6), "kirc": (350, 345, 3, 73.3),
    "kirp": (284, 260, 9, 84.6), "lihc": (347, 333, 3, 65.5), "luad": (515, 453, 10, 65.1),
    "lusc": (484, 450, 9, 57.3), "paad": (180, 166, 5, 45.8), "skcm": (268, 230, 9, 61.3),
    "stad": (374, 349, 2, 59.9), "ucec": (538, 480, 8, 84.4),
}


def test_manifest_lists_every_shipped_table_with_its_checksum():
    manifest = pd.read_csv(TABLES / "MANIFEST.csv")
    on_disk = sorted(str(p.relative_to(TABLES)) for p in TABLES.rglob("*.csv") if p.name != "MANIFEST.csv")
    assert sorted(manifest["file"]) == on_disk
    for file, rows, sha in zip(manifest["file"], manifest["rows"], manifest["sha256"]):
        assert hashlib.sha256((TABLES / file).read_bytes()).hexdigest().startswith(sha), file
        assert len(pd.read_csv(TABLES / file)) == rows, file


@pytest.mark.parametrize("cohort", TCGA_COHORTS)
def test_survival_table_counts_match_provenance(cohort):
    table = survival_table(cohort)
    rows, patients, max_slides, censored = SURVIVAL_COUNTS[cohort]
    assert len(table) == rows and table["slide_id"].is_unique
    assert table["case_id"].nunique() == patients
    assert table.groupby("case_id").size().max() == max_slides
    per_patient = table.drop_duplicates("case_id")
    assert 100 * per_patient["censorship"].mean() == pytest.approx(censored, abs=0.05)
    assert (table.groupby("case_id")[["survival_months", "censorship"]].nunique() == 1).all().all()


@pytest.mark.parametrize("cohort", TCGA_COHORTS)
def test_porpoise_splits_are_a_clean_five_fold_cv_of_the_table(cohort):
    patients = sorted(survival_table(cohort)["case_id"].unique())
    folds = read_split_dir(TABLES / "splits" / "porpoise" / cohort)
    assert len(folds) == 5
    audit_folds(folds, patients, cohort)  # no patient in two partitions, none left out
    vals = [p for f in folds for p in f.val]
    assert sorted(vals) == patients  # every patient validated exactly once


def test_clinical_stage_table_has_one_row_per_tcga_patient():
    clinical = pd.read_csv(TABLES / "tcga" / "clinical_stage.csv")
    assert len(clinical) == 11160 and clinical["bcr_patient_barcode"].is_unique
    assert clinical["type"].nunique() == 33


def test_camelyon16_labels_and_folds_match_provenance():
    labels = camelyon16_labels()
    assert len(labels) == 399 and labels["slide_id"].is_unique
    counts = labels.groupby(["split", "label"]).size().to_dict()
    assert counts == {("train", 0): 159, ("train", 1): 111, ("test", 0): 80, ("test", 1): 49}
    assert "test_049" not in set(labels["slide_id"]) and "normal_086" not in set(labels["slide_id"])
    assert labels.set_index("slide_id").loc["tumor_111", "label"] == 1
    assert set(excluded_slides()) == {"test_049"}
    folds = read_split_dir(TABLES / "camelyon16" / "folds" / "msclam")
    train = sorted(labels.loc[labels["split"] == "train", "slide_id"])
    test = sorted(labels.loc[labels["split"] == "test", "slide_id"])
    assert [(len(f.train), len(f.val), len(f.test)) for f in folds] == [(216, 54, 129)] * 5
    assert sorted(p for f in folds for p in f.val) == train
    assert all(sorted(f.test) == test for f in folds)
    audit_folds(folds, train + test, "camelyon16")


@pytest.mark.parametrize("text, expected", [
    ("Stage I", 0), ("Stage IA", 0), ("Stage IIB", 0), ("Stage IIC", 0), ("I/II NOS", 0),
    ("Stage III", 1), ("Stage IIIC1", 1), ("Stage IVB", 1), ("Stage IV", 1),
    ("[Not Available]", None), ("[Discrepancy]", None), ("[Not Applicable]", None), ("Stage X", None),
    ("Stage 0", None), ("IS", None), ("[Unknown]", None), ("nan", None),
])
def test_stage_strings_map_to_early_and_late(text, expected):
    assert stage_to_class(text) == expected


# early, late and dropped strings, counted by hand from the value counts of TCGA-CDR for the patients
# of each shipped survival table (AJCC pathologic stage; FIGO clinical stage for UCEC)
STAGE_EXPECTED = {
    "blca": (118, 253, {"[Not Available]": 2}),
    "brca": (711, 223, {"Stage X": 11, "[Discrepancy]": 6, "[Not Available]": 5}),
    "skcm": (118, 99, {"[Not Available]": 11, "Stage 0": 2}),
    "ucec": (350, 130, {}),
}


@pytest.mark.parametrize("cohort", sorted(STAGE_EXPECTED))
def test_stage_labels_and_dropped_counts(cohort):
    patients = sorted(survival_table(cohort)["case_id"].unique())
    labels, dropped = stage_labels(cohort, patients)
    early, late, expected_dropped = STAGE_EXPECTED[cohort]
    assert Counter(labels["label"]) == Counter({0: early, 1: late})
    assert dict(dropped) == expected_dropped
    assert len(labels) + sum(dropped.values()) == len(patients)
    assert labels["patient_id"].is_unique and set(labels["patient_id"]) <= set(patients)


def test_gbmlgg_stage_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="gliomas are graded, not staged"):
        stage_labels("gbmlgg", ["TCGA-02-0001"])
    assert "--task survival" in NO_STAGE


def test_mambamil_splits_are_not_shipped_as_usable_splits():
    assert not any("mambamil" in str(p).lower() for p in Path(TABLES).rglob("*"))
