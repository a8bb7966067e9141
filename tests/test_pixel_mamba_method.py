"""The registered Pixel-Mamba methods: config, weights, voting, and whole folds on tiny slides through
the slide stage (slide protocol for classification and survival, regions protocol). The loss targets
they share with two_stage are tested in test_losses.py."""
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.api import RunContext
from benchmark.registry import METHODS
from datasets.cohorts.base import Cohort, Fold, Task
from methods.pixel_mamba.method import (
    DEMO_PRESET,
    image_region_pixels,
    patient_pixels,
    vote,
)
from methods.pixel_mamba.model import pixel_mamba_6m
from methods.pixel_mamba.weights import load_weights

PINK, BLUE = (180, 90, 160), (90, 70, 190)


# ---- configuration -------------------------------------------------------------------------------------
def test_registered_methods_carry_the_paper_recipe():
    small, large = METHODS.create("pixel_mamba").config(), METHODS.create("pixel_mamba_21m").config()
    assert (small["size"], large["size"]) == ("6m", "21m")
    assert (small["epochs"], small["lr"], small["effective_batch"], small["alpha"]) == (100, 4e-4, 64, 0.8)
    assert (small["protocol"], small["n_regions"], small["region_size"], small["region_magnification"]) == ("slide", 100, 2048, 20)
    assert METHODS.get("pixel_mamba").meta["pretrained"] is False


def test_demo_preset_under_explicit_overrides():
    demo = METHODS.create("pixel_mamba", preset="demo", lr=5e-4).config()
    assert all(demo[k] == v for k, v in DEMO_PRESET.items() if k != "lr") and demo["lr"] == 5e-4


@pytest.mark.parametrize("overrides, message", [
    ({"size": "21m"}, "size is fixed"),
    ({"learning_rate": 1.0}, "unknown setting"),
    ({"protocol": "tiles"}, "protocol must be one of"),
    ({"region_size": 100}, "multiple of 32"),
])
def test_bad_settings_get_a_one_line_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        METHODS.create("pixel_mamba", **overrides)


# ---- weights ------------------------------------------------------------------------------------
def test_checkpoint_round_trip_with_ddp_prefix_and_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = pixel_mamba_6m(1000)  # e.g. an ImageNet checkpoint: its classifier does not fit
    state = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 300}, tmp_path / "ckpt.pth")
    target = pixel_mamba_6m(2)
    label, info = load_weights(target, str(tmp_path / "ckpt.pth"))
    assert label == f"pretrained:{tmp_path / 'ckpt.pth'}"
    assert info["weights_new"] == ["head.classifier.bias", "head.classifier.weight"]
    assert info["weights_unused"] == ["head.classifier.bias", "head.classifier.weight"]
    assert info["weights_taken"] == len(target.state_dict()) - 2
    assert torch.equal(target.layers[5].mixer.in_proj.weight, source.layers[5].mixer.in_proj.weight)


def test_weights_refusals(tmp_path):
    model = pixel_mamba_6m(2)
    torch.save({"layers.23.norm.weight": torch.ones(768)}, tmp_path / "big.pt")
    with pytest.raises(ValueError, match="pixel_mamba_21m"):
        load_weights(model, str(tmp_path / "big.pt"))
    torch.save({"fc.weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no Pixel-Mamba body"):
        load_weights(model, str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(model, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="no published checkpoint"):
        load_weights(model, "hub")
    assert load_weights(model, None)[0] == load_weights(model, "none")[0] == load_weights(model, "random")[0] == "none"


# ---- small pieces ---------------------------------------------------------------------------------
def test_vote_mean_and_majority():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]])
    np.testing.assert_allclose(vote(probs, "mean"), [1.75 / 3, 1.25 / 3])
    np.testing.assert_allclose(vote(probs, "majority"), [1 / 3, 2 / 3])


def test_square_regions_leave_background_out_in_zigzag_order():
    image = np.full((64, 96, 3), 255, np.uint8)
    for index, (row, col) in enumerate([(0, 0), (0, 2), (1, 1), (1, 2)]):  # (0, 1) and (1, 0) stay white
        image[32 * row:32 * row + 32, 32 * col:32 * col + 32] = (200, 100, 10 * index)
    pixels = image_region_pixels(image, min_tissue=0.25)
    assert pixels[:, 0, 0, 2].tolist() == [0, 10, 30, 20]  # (0,0), (0,2), then row 1 right to left
    assert len(image_region_pixels(np.full((64, 64, 3), 255, np.uint8), 0.25)) == 4  # nothing: keep all


# ---- whole folds on tiny slides ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """7 patients with 10x slides of 256 x 256 px (2 x 2 regions of 32 px at 2.5x); class 1 is blue.
    p5 has two slides; p6's slide file is missing."""
    from datasets.testing import tissue_image, write_pyramidal_tiff

    folder = tmp_path_factory.mktemp("slides")
    rows = []
    for p in range(7):
        for k in range(2 if p == 5 else 1):
            path = folder / f"p{p}_{k}.tif"
            if p != 6:
                image = tissue_image(256, 256, [(8, 8, 240, 240)], color=BLUE if p % 2 else PINK, seed=p)
                write_pyramidal_tiff(path, image, 1.0)
            rows.append({"slide_id": f"p{p}_{k}", "patient_id": f"p{p}", "path": str(path)})
    patients = [f"p{p}" for p in range(7)]
    labels = {
        "colour": pd.DataFrame({"patient_id": patients, "label": [p % 2 for p in range(7)]}),
        "survival": pd.DataFrame({"patient_id": patients, "time": [5.0, 9, 14, 30, 7, 20, 3],
                                  "event": [1, 1, 1, 1, 0, 1, 1]}),
    }
    tasks = {"colour": Task("colour", "classification", 2), "survival": Task("survival", "survival", 4)}
    return Cohort("tiny", pd.DataFrame(rows), labels, tasks, "colour")


FOLD = Fold(0, train=("p0", "p1", "p2", "p3"), val=("p4", "p5", "p6"))
FAST = {"epochs": 1, "effective_batch": 2, "tissue_preset": "tiny"}


@pytest.fixture
def tiny_tissue(monkeypatch):
    from datasets.tissue import TISSUE_PRESETS, TissueParams

    monkeypatch.setitem(TISSUE_PRESETS, "tiny", TissueParams(seg_downsample=4, a_t=0.01, a_h=0.001))


def context(tmp_path):
    return RunContext(out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)


def test_classification_fold_on_slides(tiny_cohort, tiny_tissue, tmp_path):
    method = METHODS.create("pixel_mamba", **FAST)
    ctx = context(tmp_path)
    method.prepare(tiny_cohort, ctx)
    out = method.run_fold(tiny_cohort, tiny_cohort.task("colour"), FOLD, seed=0, ctx=ctx)
    preds = out.predictions
    assert preds.columns.tolist() == ["patient_id", "partition", "label", "prob_0", "prob_1"]
    assert preds["patient_id"].tolist() == ["p4", "p5"] and set(preds["partition"]) == {"val"}
    assert preds["label"].tolist() == [0, 1]
    assert preds["prob_1"].dtype == np.float64  # Pixel-Mamba's result columns are float64 (two_stage's float32)
    np.testing.assert_allclose(preds["prob_0"] + preds["prob_1"], 1.0, rtol=1e-6)
    assert out.weights == "none" and out.missing_slides == ["p6_0"]
    assert out.info["patients_without_slides"] == ["p6"] and len(out.info["train_loss"]) == 1
    timings = out.info["timings"]  # the leaderboard's cost column: 1 epoch x 4 training slides, 3 val slides
    assert timings["n_train_slides"] == 4 and timings["n_infer_slides"] == 2 + 1
    assert timings["train_s"] > 0 and timings["infer_s"] > 0
    quarantined = pd.read_csv(tmp_path / "quarantine" / "tiny.csv")
    assert quarantined["slide_id"].tolist() == ["p6_0"]


def test_a_patient_bag_is_all_its_slides_regions(tiny_cohort, tiny_tissue, tmp_path):
    from datasets.lowres import TissueImage

    method = METHODS.create("pixel_mamba", **FAST)
    method.prepare(tiny_cohort, context(tmp_path))
    first, second = method._products["p5_0"].lowres, method._products["p5_1"].lowres
    bag = patient_pixels([first, second])
    n_first = len(TissueImage.load(first).regions)
    assert len(bag) == n_first + len(TissueImage.load(second).regions) == 8
    image = TissueImage.load(first).image
    assert torch.equal(bag[2], torch.from_numpy(np.array(image[32:64, 32:64])))  # 3rd in scan order: (1, 1)
    assert torch.equal(bag[n_first], patient_pixels([second])[0])


def test_survival_fold_on_patient_bags(tiny_cohort, tiny_tissue, tmp_path, monkeypatch):
    from methods.pixel_mamba.method import PixelMambaMethod

    scores = {}
    original = PixelMambaMethod._score

    def recording(self, model, sample, task, device, seed):
        scores[sample.patient_id] = out = original(self, model, sample, task, device, seed)
        return out

    monkeypatch.setattr(PixelMambaMethod, "_score", recording)
    out = METHODS.create("pixel_mamba", **FAST).run_fold(
        tiny_cohort, tiny_cohort.task("survival"), FOLD, seed=0, ctx=context(tmp_path))
    assert out.predictions["patient_id"].tolist() == ["p4", "p5"]
    assert out.predictions.columns.tolist() == ["patient_id", "partition", "time", "event", "risk"]
    assert np.isfinite(out.predictions["risk"]).all() and set(out.predictions.columns) >= {"time", "event"}
    np.testing.assert_allclose(out.predictions["risk"], [scores["p4"][0], scores["p5"][0]], rtol=1e-6)
    # the leaderboard's Kaplan-Meier split: the median risk of the fold's training patients only
    assert out.info["train_risk_median"] == pytest.approx(float(np.median([scores[p][0] for p in FOLD.train])))


def test_regions_protocol_fold(tiny_cohort, tiny_tissue, tmp_path):
    method = METHODS.create("pixel_mamba", protocol="regions", n_regions=3, train_regions=1, region_size=64,
                            region_magnification=10, vote="majority", **FAST)
    out = method.run_fold(tiny_cohort, tiny_cohort.task("colour"), FOLD, seed=0, ctx=context(tmp_path))
    preds = out.predictions
    assert preds["patient_id"].tolist() == ["p4", "p5"]
    sixths = preds["prob_1"].to_numpy() * 6  # vote shares of 3 regions (p5: the mean of its 2 slides)
    np.testing.assert_allclose(sixths, np.round(sixths), atol=1e-9)
    with pytest.raises(ValueError, match="regions protocol"):
        method.run_fold(tiny_cohort, tiny_cohort.task("survival"), FOLD, seed=0, ctx=context(tmp_path))


def test_out_of_memory_retry_turns_on_layer_checkpointing():
    from benchmark.launchers.execution import oom_retry_overrides

    method = METHODS.create("pixel_mamba")
    retry = oom_retry_overrides(method)
    assert retry == {"checkpoint_layers": True}
    assert METHODS.create("pixel_mamba", **retry).cfg.checkpoint_layers
