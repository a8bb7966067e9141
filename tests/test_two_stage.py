"""Two-stage methods end to end on a few tiny slides: slide stage, features, bags, training, predictions."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

import methods.two_stage  # noqa: F401  (registers the methods)
from benchmark.api import RunContext
from benchmark.registry import METHODS
from benchmark.runner import check_predictions
from datasets.cohorts.base import Cohort, Fold, Task
from datasets.testing import corrupt_tiles, tissue_image, write_pyramidal_tiff
from datasets.tissue import TissueParams
from methods.features import load_features
from methods.losses import loss_targets

TISSUE = TissueParams(seg_downsample=4, a_t=0.1, a_h=0.01)
TINY = {"patch_size": 64, "input_size": 32, "tissue": TISSUE, "batch_size": 32}
TASKS = {"tumour": Task("tumour", "classification", 2), "survival": Task("survival", "survival", 4)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """10 patients; P1 has two slides; P9's only slide has corrupt level-0 tiles (it opens, it segments,
    its patches fail). Odd patients have 'tumour' (purple) tissue."""
    d = tmp_path_factory.mktemp("tiny_cohort")
    rows = []
    for i in range(10):
        color = (120, 50, 150) if i % 2 else (200, 110, 170)
        image = tissue_image(512, 384, [(64, 64, 320, 192)], color=color, seed=i)
        path = write_pyramidal_tiff(d / f"S{i}.tif", image, 0.5)
        rows.append((f"S{i}", f"P{i}", str(path)))
    extra = write_pyramidal_tiff(d / "S1b.tif", tissue_image(384, 384, [(64, 64, 192, 192)], color=(120, 50, 150), seed=11), 0.5)
    rows.append(("S1b", "P1", str(extra)))
    rows[9] = ("S9", "P9", str(corrupt_tiles(rows[9][2], d / "S9_corrupt.tif", page=0)))
    slides = pd.DataFrame(rows, columns=["slide_id", "patient_id", "path"])
    patients = [f"P{i}" for i in range(10)]
    labels = {
        "tumour": pd.DataFrame({"patient_id": patients, "label": [i % 2 for i in range(10)]}),
        "survival": pd.DataFrame({"patient_id": patients, "time": [5.0, 40, 9, 30, 12, 25, 3, 50, 20, 7],
                                  "event": [1, 0, 1, 1, 1, 0, 1, 1, 1, 1]}),
    }
    return Cohort("tiny", slides, labels, TASKS, default_task="tumour")


FOLD = Fold(0, train=("P0", "P1", "P2", "P3", "P4", "P5", "P6"), val=("P7", "P8", "P9"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return RunContext(out_dir=root / "out", cache_dir=root / "cache", weights="random", progress=False, max_epochs=2)


@pytest.fixture(scope="module")
def prepared(cohort, ctx):
    method = METHODS.create("r50_abmil", **TINY)
    method.prepare(cohort, ctx)
    return method


def test_classification_fold_predicts_every_val_patient_with_features(cohort, ctx, prepared):
    task = cohort.task("tumour")
    out = prepared.run_fold(cohort, task, FOLD, seed=0, ctx=ctx)
    check_predictions(out, task, FOLD)  # the runner's own check
    preds = out.predictions
    assert preds.columns.tolist() == ["patient_id", "partition", "label", "prob_0", "prob_1"]
    assert preds["prob_1"].dtype == np.float32  # predict_bags' scores as they are (Pixel-Mamba's are float64)
    assert sorted(preds.patient_id) == ["P7", "P8"] and set(preds.partition) == {"val"}
    np.testing.assert_allclose(preds[["prob_0", "prob_1"]].sum(axis=1), 1, rtol=1e-6)
    assert out.missing_slides == ["S9"] and out.info["patients_without_slides"] == ["P9"]
    assert out.weights == "random"
    assert out.info["epochs_run"] == 2 and out.info["recipe"]["epochs"] == 2  # capped by --max-epochs
    quarantine = pd.read_csv(ctx.out_dir / "quarantine" / "tiny.csv")
    assert quarantine[["slide_id", "stage"]].values.tolist() == [["S9", "features"]]


def test_same_seed_same_predictions(cohort, ctx, prepared):
    task = cohort.task("tumour")
    first = prepared.run_fold(cohort, task, FOLD, seed=3, ctx=ctx).predictions
    again = prepared.run_fold(cohort, task, FOLD, seed=3, ctx=ctx).predictions
    other = prepared.run_fold(cohort, task, FOLD, seed=4, ctx=ctx).predictions
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first.prob_1, other.prob_1)


def test_two_slides_of_a_patient_form_one_bag(cohort, ctx, prepared):
    files = prepared.feature_files(cohort, ctx)
    samples = cohort.samples(cohort.task("tumour")).set_index("patient_id")
    targets, _ = loss_targets(samples, cohort.task("tumour"), FOLD.train)
    (bag,) = prepared.bags(["P1"], samples, files, targets)
    expected = np.concatenate([load_features(files["S1"])[0].numpy(), load_features(files["S1b"])[0].numpy()])
    np.testing.assert_array_equal(bag.load().numpy(), expected)
    assert int(bag.target["label"]) == 1


def test_survival_bins_come_from_training_patients_only(cohort, ctx, prepared):
    task = cohort.task("survival")
    out = prepared.run_fold(cohort, task, FOLD, seed=0, ctx=ctx)
    check_predictions(out, task, FOLD)
    assert out.predictions.columns.tolist() == ["patient_id", "partition", "time", "event", "risk"]
    assert np.all(out.predictions.risk.between(-4, 0))
    train = cohort.labels["survival"].set_index("patient_id").loc[list(FOLD.train)]
    uncensored = np.sort(train.time[train.event == 1].to_numpy())  # 3, 5, 9, 12, 30
    np.testing.assert_allclose(out.info["survival_bin_edges"][1:-1], np.quantile(uncensored, [0.25, 0.5, 0.75]))


def test_kaplan_meier_split_is_the_median_risk_of_the_training_patients(cohort, ctx, prepared, monkeypatch):
    calls = {}
    original = methods.two_stage.predict_bags

    def recording(model, bags, kind, device):
        out = original(model, bags, kind, device)
        calls[tuple(b.patient_id for b in bags)] = out
        return out

    monkeypatch.setattr(methods.two_stage, "predict_bags", recording)
    out = prepared.run_fold(cohort, cohort.task("survival"), FOLD, seed=0, ctx=ctx)
    train_ids = next(ids for ids in calls if set(ids) <= set(FOLD.train))
    assert set(train_ids) == set(FOLD.train)  # every training patient has features in this cohort
    assert out.info["train_risk_median"] == pytest.approx(float(np.median(calls[train_ids])))
    assert not any(set(ids) & set(FOLD.train) and set(ids) - set(FOLD.train) for ids in calls)


def test_other_aggregators_and_features_shared_across_methods(cohort, ctx, prepared):
    task = cohort.task("tumour")
    for name in ("r50_meanpool", "r50_maxpool", "r50_mambamil"):
        method = METHODS.create(name, **TINY, epochs=1)
        assert method.config()["patch"] == prepared.config()["patch"]
        assert method.feature_files(cohort, ctx) == prepared.feature_files(cohort, ctx)  # cached once
        check_predictions(method.run_fold(cohort, task, FOLD, seed=0, ctx=ctx), task, FOLD)


def test_user_made_feature_folder(cohort, ctx, prepared, tmp_path):
    import shutil

    for slide_id, path in prepared.feature_files(cohort, ctx).items():
        shutil.copy(path, tmp_path / f"{slide_id}.h5")
    method = METHODS.create("r50_abmil", features_dir=str(tmp_path))
    method.prepare(cohort, ctx)  # nothing to build
    out = method.run_fold(cohort, cohort.task("tumour"), FOLD, seed=0, ctx=ctx)
    assert out.missing_slides == ["S9"] and out.weights == "random"  # read from the files' attributes
    with pytest.raises(FileNotFoundError, match="features_dir"):
        METHODS.create("r50_abmil", features_dir=str(tmp_path / "nowhere")).prepare(cohort, ctx)


def test_registrations_and_settings():
    for name in ("r50_abmil", "r50_mambamil", "conch_abmil", "conch_mambamil", "r50_meanpool", "r50_maxpool"):
        entry = METHODS.get(name)
        assert entry.meta == {"family": "two-stage", "pretrained": True}
    conch = METHODS.create("conch_abmil").config()
    assert conch["encoder"] == "conch_v1" and conch["patch"]["patch_size"] == 512 and conch["input_size"] is None
    assert METHODS.create("conch_abmil", preset="demo").config()["input_size"] == 224
    assert METHODS.create("r50_abmil", preset="demo").config()["input_size"] is None
    r50 = METHODS.create("r50_mambamil", lr=1e-4).config()
    assert r50["patch"]["patch_size"] == 256 and r50["recipes"]["classification"]["lr"] == 1e-4
    assert r50["recipes"]["survival"] == {**dataclasses.asdict(methods.two_stage.RECIPES["survival"]), "lr": 1e-4}
    with pytest.raises(ValueError, match="has no setting"):
        METHODS.create("r50_abmil", learning_rate=1)
    with pytest.raises(ValueError, match="unknown preset"):
        METHODS.create("r50_abmil", preset="fast")
