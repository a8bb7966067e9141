"""Split sources and the leak audit: shipped files, CLAM-style folders, generated folds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datasets.cohorts.base import Cohort, Task
from datasets.splits import (
    SplitLeakError,
    audit_folds,
    check_splits_option,
    generate_folds,
    make_split_provider,
    read_split_dir,
    write_split_dir,
)

MAMBAMIL = Path(__file__).parent / "data" / "mambamil_splits"
CLASSIFICATION = Task("label", "classification", 3)
SURVIVAL = Task("survival", "survival", 4)


@pytest.mark.parametrize("cohort, fold0_overlap", [("blca", 14), ("ucec", 15)])
def test_audit_rejects_mambamil_splits_naming_the_leaked_patients(cohort, fold0_overlap):
    raw = pd.read_csv(MAMBAMIL / cohort / "splits_0.csv", dtype=str)
    leaked = sorted(set(raw["train"].dropna()) & set(raw["val"].dropna()))
    assert len(leaked) == fold0_overlap  # PROVENANCE.md section 2
    folds = read_split_dir(MAMBAMIL / cohort)
    patients = sorted({p for f in folds for part in f.partitions().values() for p in part})
    with pytest.raises(SplitLeakError, match=f"fold 0 .*{fold0_overlap} patients in two partitions") as err:
        audit_folds(folds, patients, f"tcga_{cohort}")
    assert all(p in str(err.value) for p in leaked[:10])


def samples_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)],
        "label": rng.choice(3, n, p=[0.6, 0.3, 0.1]),
        "time": rng.exponential(30, n).round(1),
        "event": (rng.uniform(size=n) < 0.45).astype(int),
    })


@pytest.mark.parametrize("task", [CLASSIFICATION, SURVIVAL])
def test_generated_folds_are_patient_disjoint_balanced_and_repeatable(task):
    samples = samples_frame(83)
    folds = generate_folds(samples, task, 5, seed=7)
    audit_folds(folds, samples["patient_id"].tolist())
    for fold in folds:
        assert not set(fold.train) & set(fold.val)
        assert sorted(fold.train + fold.val) == sorted(samples["patient_id"])
    vals = [p for f in folds for p in f.val]
    assert sorted(vals) == sorted(samples["patient_id"])  # every patient validated exactly once
    column = "label" if task.kind == "classification" else "event"
    by_id = samples.set_index("patient_id")[column]
    for value in by_id.unique():
        per_fold = [int((by_id[list(f.val)] == value).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (value, per_fold)  # proportions within one patient
    sizes = [len(f.val) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert generate_folds(samples, task, 5, seed=7) == folds
    assert generate_folds(samples, task, 5, seed=8) != folds


def test_generated_survival_folds_spread_over_the_time_range():
    samples = samples_frame(83).assign(time=lambda d: np.random.default_rng(1).permutation(len(d)) + 0.5)
    folds = generate_folds(samples, SURVIVAL, 5, seed=3)
    fold_of = {p: f.index for f in folds for p in f.val}
    for event in (0, 1):
        by_time = samples[samples["event"] == event].sort_values("time")["patient_id"].tolist()
        full_blocks = [by_time[i : i + 5] for i in range(0, len(by_time) - len(by_time) % 5, 5)]
        assert full_blocks and all(len({fold_of[p] for p in block}) == 5 for block in full_blocks)


def test_a_class_smaller_than_the_number_of_folds_is_kept():
    samples = pd.DataFrame({"patient_id": [f"P{i}" for i in range(11)], "label": [0] * 8 + [1] * 2 + [2]})
    folds = generate_folds(samples, CLASSIFICATION, 5, seed=0)
    audit_folds(folds, samples["patient_id"].tolist())
    assert sorted(len(f.val) for f in folds) == [2, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="11 patients cannot make 12 folds; use --folds 11 or fewer"):
        generate_folds(samples, CLASSIFICATION, 12, seed=0)


def test_generated_folds_keep_an_external_test_set_out_of_the_cross_validation():
    samples = samples_frame(40)
    test = samples["patient_id"].iloc[:10].tolist()
    folds = generate_folds(samples, CLASSIFICATION, 3, seed=0, test=test)
    for fold in folds:
        assert sorted(fold.test) == sorted(test)
        assert not set(test) & (set(fold.train) | set(fold.val))
    assert sorted(p for f in folds for p in f.val) == sorted(samples["patient_id"].iloc[10:])


def cohort_with_two_slide_patient(tmp_path: Path) -> Cohort:
    slides = pd.DataFrame({
        "slide_id": [f"S{i}" for i in range(12)] + ["S0b"],
        "patient_id": [f"P{i}" for i in range(12)] + ["P0"],
        "path": [str(tmp_path / f"S{i}.tif") for i in range(12)] + [str(tmp_path / "S0b.tif")],
    })
    labels = {"label": pd.DataFrame({"patient_id": [f"P{i}" for i in range(12)], "label": [0, 1, 2] * 4})}
    return Cohort("toy", slides, labels, {"label": CLASSIFICATION}, "label")


def test_split_dir_roundtrip_and_slide_ids_become_patients(tmp_path):
    cohort = cohort_with_two_slide_patient(tmp_path)
    folds = generate_folds(cohort.samples(CLASSIFICATION), CLASSIFICATION, 3, seed=1)
    written = write_split_dir(folds, tmp_path / "splits")
    assert sorted(p.name for p in written.iterdir()) == ["splits_0.csv", "splits_1.csv", "splits_2.csv"]
    back = read_split_dir(written)
    assert [(f.train, f.val, f.test) for f in back] == [(f.train, f.val, f.test) for f in folds]
    # CLAM writes slide ids: both slides of P0 in one partition read as one patient
    clam = tmp_path / "clam"
    clam.mkdir()
    pd.concat({"train": pd.Series(["S0", "S0b", "S1", "S2", "S3"]), "val": pd.Series(["S4", "S5"])}, axis=1).to_csv(clam / "splits_0.csv")
    (fold,) = read_split_dir(clam, cohort.slides)
    assert fold.train == ("P0", "P1", "P2", "P3") and fold.val == ("P4", "P5")


def test_a_multi_slide_patient_straddling_partitions_is_refused_by_the_cohort(tmp_path):
    cohort = cohort_with_two_slide_patient(tmp_path)
    clam = tmp_path / "clam"
    clam.mkdir()
    ids = [f"S{i}" for i in range(12)]
    pd.concat({"train": pd.Series(ids[:8]), "val": pd.Series(ids[8:] + ["S0b"])}, axis=1).to_csv(clam / "splits_0.csv")
    cohort.split_provider = make_split_provider(cohort, str(clam))
    with pytest.raises(SplitLeakError, match="1 patients in two partitions: P0"):
        cohort.folds(CLASSIFICATION, 1, seed=0)


def test_split_dir_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--splits nowhere"):
        check_splits_option("nowhere")
    with pytest.raises(FileNotFoundError, match="no splits_<k>.csv"):
        read_split_dir(tmp_path)
    pd.DataFrame({"train": ["A"], "val": ["B"]}).to_csv(tmp_path / "splits_1.csv")
    with pytest.raises(ValueError, match="without gaps"):
        read_split_dir(tmp_path)
    pd.DataFrame({"training": ["A"]}).to_csv(tmp_path / "splits_0.csv")
    with pytest.raises(ValueError, match="needs columns 'train' and 'val'"):
        read_split_dir(tmp_path)


def test_provider_modes(tmp_path):
    cohort = cohort_with_two_slide_patient(tmp_path)
    shipped_dir = write_split_dir(generate_folds(cohort.samples(CLASSIFICATION), CLASSIFICATION, 3, seed=5), tmp_path / "shipped")
    shipped = {"label": (shipped_dir, "shipped test splits")}
    default = make_split_provider(cohort, "default", shipped=shipped)(CLASSIFICATION, 3, 0)
    assert [f.source for f in default] == ["shipped test splits"] * 3
    assert [f.val for f in default] == [f.val for f in read_split_dir(shipped_dir)]
    assert len(make_split_provider(cohort, "default", shipped=shipped)(CLASSIFICATION, 2, 0)) == 2
    with pytest.raises(ValueError, match="has 3 folds, 4 were asked for; use --folds 3 or --splits generate"):
        make_split_provider(cohort, "default", shipped=shipped)(CLASSIFICATION, 4, 0)
    generated = make_split_provider(cohort, "generate", shipped=shipped)(CLASSIFICATION, 3, 0)
    assert generated == generate_folds(cohort.samples(CLASSIFICATION), CLASSIFICATION, 3, 0)
    from_dir = make_split_provider(cohort, str(shipped_dir))(CLASSIFICATION, 3, 0)
    assert [f.val for f in from_dir] == [f.val for f in default]
