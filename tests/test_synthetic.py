"""The synthetic cohort: real slide files, deterministic by seed, labels with the promised structure."""
from __future__ import annotations

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

import datasets.synthetic as synthetic_module
from benchmark.registry import DATASETS, load_all
from datasets.splits import audit_folds
from datasets.synthetic import (
    EOSIN,
    HEMATOXYLIN,
    generate_synthetic_cohort,
    plan_cohort,
    read_labels,
)

SMALL = (1024, 768)  # level-0 size for the determinism tests: 5 levels still reach 16x


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    """Full-size slides (4096 x 3072 at 0.25 um/px) for a few patients."""
    return generate_synthetic_cohort(tmp_path_factory.mktemp("synthetic"), seed=3, n_patients=6)


def test_default_plan_has_forty_patients_and_the_promised_label_structure():
    _, labels = plan_cohort(seed=0, n_patients=40)
    patients = labels.drop_duplicates("patient_id")
    assert len(labels) >= 40 and len(patients) == 40
    assert patients["stage"].value_counts().to_dict() == {0: 20, 1: 10, 2: 10}
    assert (patients["metastasis"] == (patients["stage"] > 0)).all()
    assert patients["event"].mean() == pytest.approx(0.6)  # 40% censored
    slides_per_patient = labels.groupby("patient_id").size()
    assert (slides_per_patient == 2).sum() >= 8
    # a positive two-slide patient's tumour can be in either slide: both placements occur
    two = labels[labels["patient_id"].isin(slides_per_patient[slides_per_patient == 2].index) & (labels["stage"] > 0)]
    where = two.assign(k=two["slide_id"].str[-1], t=two["tumor_fraction"] > 0).pivot(index="patient_id", columns="k", values="t")
    assert {(True, False), (False, True), (True, True)} <= set(map(tuple, where[["1", "2"]].to_numpy()))
    # labels are per patient: every slide of a patient carries the same labels
    assert (labels.groupby("patient_id")[["metastasis", "stage", "time", "event"]].nunique() == 1).all().all()


def test_survival_hazard_grows_with_tumour_burden():
    _, labels = plan_cohort(seed=0, n_patients=400)
    patients = labels.drop_duplicates("patient_id")
    observed = patients[patients["event"] == 1]
    median_by_stage = observed.groupby("stage")["time"].median()
    assert median_by_stage[0] > 2 * median_by_stage[1] > median_by_stage[2]
    assert 1 - patients["event"].mean() == pytest.approx(0.4)


def test_openslide_opens_every_slide_at_40x_with_a_2_5x_level(cohort_dir):
    labels = read_labels(cohort_dir)
    assert list(labels.columns[:6]) == ["slide_id", "patient_id", "metastasis", "stage", "time", "event"]
    for slide_id in labels["slide_id"]:
        with openslide.OpenSlide(cohort_dir / "slides" / f"{slide_id}.tiff") as slide:
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
            assert slide.dimensions == (4096, 3072)
            assert max(slide.level_downsamples) >= 16
            lowres = np.asarray(slide.read_region((0, 0), slide.level_count - 1, slide.level_dimensions[-1]))
            tissue = (lowres[..., :3].min(axis=2) < 200).mean()
            assert 0.25 < tissue < 0.55  # tissue pieces on a white background


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(np.float64), 1) / 255)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Least-squares colour deconvolution onto the H and E vectors: the hematoxylin amount per pixel."""
    stains = np.stack([HEMATOXYLIN, EOSIN], axis=1).astype(np.float64)  # (3, 2)
    amounts, *_ = np.linalg.lstsq(stains, optical_density(rgb).reshape(-1, 3).T, rcond=None)
    return amounts[0].reshape(rgb.shape[:2])


def test_tumour_is_more_hematoxylin_at_2_5x_and_denser_in_nuclei_at_20x(cohort_dir):
    import cv2

    labels = read_labels(cohort_dir)
    positives = labels[labels["tumor_fraction"] > 0]
    assert len(positives) >= 2
    for slide_id in labels["slide_id"]:
        annotation = cv2.imread(str(cohort_dir / "annotations" / f"{slide_id}.png"), cv2.IMREAD_GRAYSCALE)
        with openslide.OpenSlide(cohort_dir / "slides" / f"{slide_id}.tiff") as slide:
            lowres = np.asarray(slide.read_region((0, 0), 4, slide.level_dimensions[4]).convert("RGB"))
            h = hematoxylin(lowres)
            normal_h = h[annotation == 1].mean()
            assert normal_h < 0.4
            if slide_id in set(positives["slide_id"]):
                assert h[annotation == 2].mean() > normal_h + 0.3
                # texture at 20x: the share of nucleus-dark pixels in a 256-px tumour patch vs a normal one
                dark = {}
                for cls in (1, 2):
                    rows, cols = np.nonzero(cv2.erode((annotation == cls).astype(np.uint8), np.ones((5, 5))))
                    y, x = rows[len(rows) // 2] * 16, cols[len(cols) // 2] * 16
                    patch = np.asarray(slide.read_region((x - 256, y - 256), 1, (256, 256)).convert("RGB"))
                    dark[cls] = (hematoxylin(patch) > 0.7).mean()
                assert dark[2] > 3 * dark[1]
            else:
                assert not (annotation == 2).any()


def test_same_seed_same_pixels_and_labels_other_seed_differs(tmp_path):
    a = generate_synthetic_cohort(tmp_path / "a", seed=5, n_patients=4, slide_size=SMALL)
    b = generate_synthetic_cohort(tmp_path / "b", seed=5, n_patients=4, slide_size=SMALL, workers=1)
    c = generate_synthetic_cohort(tmp_path / "c", seed=6, n_patients=4, slide_size=SMALL)
    pd.testing.assert_frame_equal(read_labels(a), read_labels(b))
    assert not read_labels(a)[["time"]].equals(read_labels(c)[["time"]])
    for slide_id in read_labels(a)["slide_id"]:
        pa, pb = (tifffile.imread(d / "slides" / f"{slide_id}.tiff") for d in (a, b))
        np.testing.assert_array_equal(pa, pb)
    first = read_labels(a)["slide_id"].iloc[0]
    assert not np.array_equal(tifffile.imread(a / "slides" / f"{first}.tiff"), tifffile.imread(c / "slides" / f"{first}.tiff"))


def test_second_call_reuses_the_files_and_other_parameters_are_refused(tmp_path):
    root = generate_synthetic_cohort(tmp_path, seed=0, n_patients=4, slide_size=SMALL)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    generate_synthetic_cohort(tmp_path, seed=0, n_patients=4, slide_size=SMALL)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    with pytest.raises(ValueError, match="another --data-root"):
        generate_synthetic_cohort(tmp_path, seed=1, n_patients=4, slide_size=SMALL)


def test_registered_cohort_has_three_tasks_and_audited_patient_level_folds(tmp_path):
    load_all()
    cohort = DATASETS.create("synthetic", data_root=None, cache_dir=tmp_path, seed=2, n_patients=10, slide_size=SMALL)
    assert (tmp_path / "synthetic" / "seed2_n10_1024x768" / "synthetic.json").exists()
    assert cohort.default_task == "metastasis"
    assert {t: (cohort.tasks[t].kind, cohort.tasks[t].n_classes) for t in cohort.tasks} == {
        "metastasis": ("classification", 2), "stage": ("classification", 3), "survival": ("survival", 4)}
    table = read_labels(tmp_path / "synthetic" / "seed2_n10_1024x768")
    assert sorted(cohort.slides["slide_id"]) == sorted(table["slide_id"])
    assert all(p.endswith(".tiff") and openslide.OpenSlide.detect_format(p) == "generic-tiff" for p in cohort.slides["path"])
    for name, task in cohort.tasks.items():
        samples = cohort.samples(task)
        assert len(samples) == 10  # one sample per patient, two-slide patients are one bag
        assert samples["slide_ids"].map(len).max() == 2
        folds = cohort.folds(task, 2, seed=0)
        audit_folds(folds, samples["patient_id"].tolist())
        assert sorted(p for f in folds for p in f.val) == sorted(samples["patient_id"])
    stage = cohort.labels["stage"].set_index("patient_id")["label"]
    expected = table.drop_duplicates("patient_id").set_index("patient_id")["stage"]
    pd.testing.assert_series_equal(stage.sort_index(), expected.sort_index(), check_names=False)


def test_progress_off_generates_without_a_bar(tmp_path, capfd):
    load_all()
    DATASETS.create("synthetic", data_root=tmp_path / "quiet", cache_dir=tmp_path, n_patients=4, slide_size=SMALL,
                    progress=False)
    assert capfd.readouterr().err == ""
    DATASETS.create("synthetic", data_root=tmp_path / "bar", cache_dir=tmp_path, n_patients=4, slide_size=SMALL)
    assert "synthetic cohort" in capfd.readouterr().err  # the check above can see a bar


class _Stop(Exception):
    pass


def test_no_progress_reaches_the_generator(tmp_path, monkeypatch):
    from benchmark.runner import RunOptions, build_cohort

    seen = {}

    def generator(root, seed, n_patients, **kw):
        seen.update(kw)
        raise _Stop  # the arguments are all this test needs

    load_all()
    monkeypatch.setattr(synthetic_module, "generate_synthetic_cohort", generator)
    with pytest.raises(_Stop):
        build_cohort(RunOptions(methods=[], dataset="synthetic", cache_dir=tmp_path, progress=False))
    assert seen["progress"] is False
