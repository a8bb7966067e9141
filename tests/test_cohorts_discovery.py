"""Real-cohort adapters on folders laid out like the real downloads, with tiny slides under real names."""
from __future__ import annotations

import shutil

import openslide
import pandas as pd
import pytest

from benchmark.registry import DATASETS, load_all
from datasets.cohorts.base import Fold
from datasets.cohorts.discovery import find_slides
from datasets.cohorts.tcga import TABLES, survival_table
from datasets.splits import SplitLeakError, read_split_dir, write_split_dir
from datasets.testing_cohorts import make_camelyon16_release, make_tcga_download

TINY = (1024, 768)


@pytest.fixture(scope="module", params=["gdc", "flat"])
def tcga_release(request, tmp_path_factory):
    return make_tcga_download(tmp_path_factory.mktemp(f"tcga_{request.param}"), "blca", per_fold=2,
                              slide_size=TINY, layout=request.param)


@pytest.fixture(scope="module", params=["official", "flat"])
def camelyon_release(request, tmp_path_factory):
    return make_camelyon16_release(tmp_path_factory.mktemp(f"c16_{request.param}"), per_fold=(1, 1),
                                   n_test=(2, 2), slide_size=TINY, layout=request.param)


def create(name, root, tmp_path, **kw):
    load_all()
    return DATASETS.create(name, data_root=root, cache_dir=tmp_path, **kw)


def test_tcga_download_is_found_matched_and_reported(tcga_release, tmp_path):
    cohort = create("tcga_blca", tcga_release.root, tmp_path)
    assert sorted(cohort.slides["slide_id"]) == tcga_release.slides
    assert sorted(cohort.slides["patient_id"].unique()) == tcga_release.patients
    assert all(openslide.OpenSlide.detect_format(p) == "aperio" for p in cohort.slides["path"])
    table = survival_table("blca")
    assert cohort.slides["patient_id"].value_counts().max() >= 2  # a multi-slide patient is picked
    notes = "\n".join(cohort.notes)
    assert f"{len(tcga_release.slides)} slides of {len(tcga_release.patients)} of the 373 labelled patients" in notes
    assert f"{373 - len(tcga_release.patients)} labelled patients have no slide" in notes
    assert f"1 slide files have no label and are not used: {tcga_release.unlabelled[0]}" in notes
    assert "stage: 371 patients labelled (early 118, late 253" in notes and "[Not Available]: 2" in notes
    # survival labels: one per patient, event = 1 - censorship
    samples = cohort.samples(cohort.task("survival"))
    expected = table.drop_duplicates("case_id").set_index("case_id").loc[samples["patient_id"]]
    assert samples["time"].tolist() == expected["survival_months"].tolist()
    assert samples["event"].tolist() == (1 - expected["censorship"]).tolist()
    assert samples["slide_ids"].map(len).sum() == len(tcga_release.slides)


def test_tcga_survival_uses_porpoise_folds_restricted_to_present_patients(tcga_release, tmp_path):
    cohort = create("tcga_blca", tcga_release.root, tmp_path)
    folds = cohort.folds(cohort.task("survival"), 5, seed=0)
    porpoise = read_split_dir(TABLES / "splits" / "porpoise" / "blca")
    present = set(tcga_release.patients)
    for fold, published in zip(folds, porpoise):
        assert set(fold.val) == set(published.val) & present
        assert set(fold.train) == set(published.train) & present
        assert "PORPOISE" in fold.source
    assert "survival: PORPOISE" in cohort.protocol
    stage_folds = cohort.folds(cohort.task("stage"), 5, seed=0)
    assert all(f.source.startswith("generated") for f in stage_folds)
    assert sorted(p for f in stage_folds for p in f.val) == sorted(cohort.samples(cohort.task("stage"))["patient_id"])
    generated = create("tcga_blca", tcga_release.root, tmp_path, splits="generate").folds(cohort.task("survival"), 5, seed=0)
    assert all(f.source.startswith("generated") for f in generated)


def test_tcga_split_dir_with_a_leak_is_refused(tcga_release, tmp_path):
    cohort = create("tcga_blca", tcga_release.root, tmp_path)
    folds = cohort.folds(cohort.task("survival"), 5, seed=0)
    leaky = Fold(0, folds[0].train, folds[0].val + folds[0].train[:1])
    split_dir = write_split_dir([leaky], tmp_path / "leaky")
    cohort = create("tcga_blca", tcga_release.root, tmp_path, splits=str(split_dir))
    with pytest.raises(SplitLeakError, match=f"two partitions: {folds[0].train[0]}"):
        cohort.folds(cohort.task("survival"), 1, seed=0)


def test_camelyon16_release_is_found_with_renamed_and_excluded_slides(camelyon_release, tmp_path):
    cohort = create("camelyon16", camelyon_release.root, tmp_path)
    assert sorted(cohort.slides["slide_id"]) == camelyon_release.slides
    assert "tumor_111" in set(cohort.slides["slide_id"])
    renamed_path = cohort.slides.set_index("slide_id").loc["tumor_111", "path"]
    assert renamed_path.endswith("normal_086.tif")
    labels = cohort.labels["metastasis"].set_index("patient_id")["label"]
    assert labels["tumor_111"] == 1
    notes = "\n".join(cohort.notes)
    assert "normal_086 is used as tumor_111" in notes and "test_049 is left out" in notes
    assert "official test set: 4 of 129 slides on disk (2 normal, 2 tumour)" in notes
    assert "have no label" not in notes  # the mask and the annotation XML are not slides
    assert len(find_slides(camelyon_release.root)) == len(camelyon_release.slides) + 1  # + test_049


def test_camelyon16_folds_cross_validate_training_slides_and_test_on_the_official_set(camelyon_release, tmp_path):
    official_test = sorted(s for s in camelyon_release.slides if s.startswith("test_"))
    for splits in ("default", "generate"):
        cohort = create("camelyon16", camelyon_release.root, tmp_path, splits=splits)
        folds = cohort.folds(cohort.task(), 5, seed=0)
        assert all(sorted(f.test) == official_test and f.reported == "test" for f in folds)
        train = sorted(s for s in camelyon_release.slides if not s.startswith("test_"))
        assert sorted(p for f in folds for p in f.val) == train
    msclam = read_split_dir(TABLES / "camelyon16" / "folds" / "msclam")
    default = create("camelyon16", camelyon_release.root, tmp_path).folds(cohort.task(), 5, seed=0)
    assert all(set(f.val) <= set(m.val) for f, m in zip(default, msclam))


def test_camelyon16_names_match_case_insensitively(tmp_path):
    release = make_camelyon16_release(tmp_path / "c16", per_fold=(1, 0), n_test=(0, 0), slide_size=(512, 512),
                                      layout="flat", quirks=False)
    first = release.slides[0]
    shutil.move(tmp_path / "c16" / f"{first}.tif", tmp_path / "c16" / f"{first.capitalize()}.tif")
    cohort = create("camelyon16", tmp_path / "c16", tmp_path)
    assert first in set(cohort.slides["slide_id"])


def test_duplicate_slide_files_use_the_first_and_say_so(tmp_path):
    release = make_camelyon16_release(tmp_path / "c16", per_fold=(1, 0), n_test=(0, 0), slide_size=(512, 512),
                                      layout="flat", quirks=False)
    first = release.slides[0]
    (tmp_path / "c16" / "zcopy").mkdir()
    shutil.copy(tmp_path / "c16" / f"{first}.tif", tmp_path / "c16" / "zcopy" / f"{first}.tif")
    cohort = create("camelyon16", tmp_path / "c16", tmp_path)
    assert cohort.slides.set_index("slide_id").loc[first, "path"] == str((tmp_path / "c16" / f"{first}.tif").resolve())
    assert any(n.startswith(f"{first} is on disk 2 times") for n in cohort.notes)


def test_user_errors_have_one_line_messages(tmp_path):
    with pytest.raises(ValueError, match="tcga_luad needs --data-root"):
        create("tcga_luad", None, tmp_path)
    with pytest.raises(ValueError, match="camelyon16 needs --data-root"):
        create("camelyon16", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        create("tcga_luad", tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="none of the 515 TCGA-LUAD diagnostic slides"):
        create("tcga_luad", tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="--splits nowhere"):
        create("tcga_luad", tmp_path / "empty", tmp_path, splits="nowhere")


def test_gbmlgg_refuses_stage_and_keeps_survival(tmp_path):
    table = survival_table("gbmlgg")
    release = make_tcga_download(tmp_path / "gbmlgg", "gbmlgg", per_fold=2, slide_size=(512, 512), layout="flat")
    cohort = create("tcga_gbmlgg", release.root, tmp_path)
    assert list(cohort.tasks) == ["survival"] and cohort.task().name == "survival"
    with pytest.raises(ValueError, match="gliomas are graded, not staged.*--task survival"):
        cohort.task("stage")
    assert set(cohort.slides["patient_id"]) <= set(table["case_id"])


def test_ucec_stage_is_figo(tmp_path):
    release = make_tcga_download(tmp_path / "ucec", "ucec", per_fold=2, slide_size=(512, 512), layout="flat")
    cohort = create("tcga_ucec", release.root, tmp_path)
    assert "FIGO" in cohort.task("stage").description
    assert "stage: 480 patients labelled (early 350, late 130" in "\n".join(cohort.notes)
    clinical = pd.read_csv(TABLES / "tcga" / "clinical_stage.csv").set_index("bcr_patient_barcode")
    labels = cohort.labels["stage"].set_index("patient_id")["label"]
    figo = clinical.loc[labels.index, "clinical_stage"]
    assert (labels[figo.str.startswith(("Stage III", "Stage IV"))] == 1).all()
    assert (labels[~figo.str.startswith(("Stage III", "Stage IV"))] == 0).all()
