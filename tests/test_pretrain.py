"""ImageNet-style pretraining on a tiny generated image folder (3 colour classes), on the CPU: the loss
falls and top-1 rises above chance, a run interrupted mid-epoch resumes to bitwise the same state as an
uninterrupted one, the data stream does not depend on the GPU layout, the recipe is the paper's, and
user errors get one-line messages."""
import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.pretrain import (
    CHECKPOINT_NAME,
    IMAGENET_TRAIN_IMAGES,
    PretrainConfig,
    SeededTransformDataset,
    StepSampler,
    create_model,
    create_optimizer,
    create_scheduler,
    eval_loader,
    evaluate,
    load_checkpoint,
    main,
    pretrain,
    train_transform,
)

COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}


def write_image_folder(root, n_train=3, n_val=2, size=64, seed=0):
    """root/{train,val}/{blue,green,red}/*.png: noisy flat colours, 64 x 64 (trained at 32 x 32)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_config(data, out, **overrides):
    """The paper's recipe (mixup, smoothing, random erasing, AdamW, cosine) at toy scale: 9 training
    images, 4 per optimizer step in 2 micro-batches of 2, so 2 steps per epoch (one image left out)."""
    settings = dict(data=str(data), out=str(out), img_size=32, epochs=2, global_batch=4, batch_size=2,
                    warmup_epochs=0, workers=0, progress=False)
    return PretrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted run (pushed to a local folder at the end), and one through the command line,
    stopped after step 1 (mid-epoch 1) and rerun to the end."""
    root = tmp_path_factory.mktemp("pretrain")
    data = write_image_folder(root / "data")
    whole = pretrain(tiny_config(data, root / "whole", push_to_hub=str(root / "pushed")))
    argv = ["--data", str(data), "--out", str(root / "resumed"), "--img-size", "32", "--epochs", "2", "--global-batch", "4",
            "--batch-size", "2", "--warmup-epochs", "0", "--workers", "0", "--no-progress"]
    printed = []
    for extra in (["--max-steps", "1"], []):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv + extra) == 0
        printed.append(out.getvalue())
    return {"root": root, "data": data, "whole": whole, "printed": printed}


def test_loss_falls_and_top1_beats_chance_on_the_training_images(runs):
    cfg = tiny_config(runs["data"], runs["root"] / "whole")
    untrained = create_model(cfg, num_classes=3)
    trained = create_model(cfg, num_classes=3)
    trained.load_state_dict(load_checkpoint(runs["root"] / "whole" / CHECKPOINT_NAME)["model"])
    images = eval_loader(runs["data"] / "train", cfg.img_size, batch_size=9)
    before, after = evaluate(untrained, images, torch.device("cpu")), evaluate(trained, images, torch.device("cpu"))
    assert after["loss"] < before["loss"]
    assert after["top1"] > 100 / 3 + 20, (before, after)
    assert after["top5"] == 100.0  # 3 classes: top-5 is every class
    history = runs["whole"]["history"]
    assert [h["epoch"] for h in history] == [1, 2] and [h["step"] for h in history] == [2, 4]


def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(runs):
    assert "stopped after step 1" in runs["printed"][0] and "done:" in runs["printed"][1]
    whole = load_checkpoint(runs["root"] / "whole" / CHECKPOINT_NAME)
    resumed = load_checkpoint(runs["root"] / "resumed" / CHECKPOINT_NAME)
    assert (whole["epoch"], whole["step"]) == (resumed["epoch"], resumed["step"]) == (2, 4)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for index, state in whole["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], resumed["optimizer"]["state"][index][key]), (index, key)
    assert whole["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    assert whole["history"] == resumed["history"]


def test_checkpoint_holds_the_training_state_and_a_model_folder_is_written(runs):
    state = load_checkpoint(runs["root"] / "whole" / CHECKPOINT_NAME)
    assert set(state) >= {"model", "optimizer", "scheduler", "epoch", "step", "rng", "config", "classes"}
    assert state["classes"] == sorted(COLOURS) and state["config"]["model"] == "pixel_mamba_6m"
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    folder = runs["root"] / "whole" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 3 and config["metrics"]["val_top1"] == runs["whole"]["history"][-1]["top1"]
    assert not list((runs["root"] / "whole").glob(".*"))  # atomic writes leave no hidden temporary behind
    assert runs["whole"]["pushed"] == str(runs["root"] / "pushed")
    pushed = (runs["root"] / "pushed" / "model.safetensors").read_bytes()
    assert pushed == (folder / "model.safetensors").read_bytes()


def test_tensorboard_log_has_training_and_validation_curves(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "whole" / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/top1", "val/top5", "val/loss"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([h["top1"] for h in runs["whole"]["history"]])


def test_resuming_with_other_settings_is_refused(runs):
    with pytest.raises(ValueError, match="other settings.*lr"):
        pretrain(tiny_config(runs["data"], runs["root"] / "whole", lr=5e-4))


# ---- into the WSI model ------------------------------------------------------------------------
def test_the_checkpoint_loads_into_the_wsi_model_body_with_a_new_head(runs):
    from methods.pixel_mamba.model import pixel_mamba_6m, pixel_mamba_21m
    from methods.pixel_mamba.weights import load_weights

    checkpoint = runs["root"] / "whole" / CHECKPOINT_NAME
    pretrained = load_checkpoint(checkpoint)["model"]
    for path in (checkpoint, runs["root"] / "whole" / "model" / "model.safetensors"):
        wsi = pixel_mamba_6m(3)  # as many classes as the pretraining: the head is new all the same
        fresh_head = {k: v.clone() for k, v in wsi.state_dict().items() if k.startswith("head.")}
        label, info = load_weights(wsi, str(path))
        assert label == f"pretrained:{path}"
        state = wsi.state_dict()
        assert all(torch.equal(state[k], v) for k, v in pretrained.items() if k.startswith("layers."))
        assert info["weights_taken"] == sum(k.startswith("layers.") for k in state) + 1  # + head.norm
        assert info["weights_new"] == sorted(k for k in fresh_head if k != "head.norm.weight")
        assert info["weights_unused"] == ["head.fc.bias", "head.fc.weight"]
        assert all(torch.equal(state[k], fresh_head[k]) for k in info["weights_new"])
    with pytest.raises(ValueError, match=r"for pixel_mamba \(6M\), not this model"):
        load_weights(pixel_mamba_21m(2), str(checkpoint))


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """4 patients, one 256 x 256 slide each at 10x (2 x 2 regions of 32 px at 2.5x); class 1 is blue."""
    import pandas as pd

    from datasets.cohorts.base import Cohort, Task
    from datasets.testing import tissue_image, write_pyramidal_tiff

    folder = tmp_path_factory.mktemp("slides")
    rows = []
    for p in range(4):
        image = tissue_image(256, 256, [(8, 8, 240, 240)], color=(90, 70, 190) if p % 2 else (180, 90, 160), seed=p)
        write_pyramidal_tiff(folder / f"p{p}.tif", image, 1.0)
        rows.append({"slide_id": f"p{p}", "patient_id": f"p{p}", "path": str(folder / f"p{p}.tif")})
    labels = {"colour": pd.DataFrame({"patient_id": [r["patient_id"] for r in rows], "label": [p % 2 for p in range(4)]})}
    return Cohort("tiny", pd.DataFrame(rows), labels, {"colour": Task("colour", "classification", 2)}, "colour")


def test_pixel_mamba_fine_tunes_from_the_checkpoint_on_a_synthetic_cohort(runs, tiny_cohort, tmp_path, monkeypatch):
    from benchmark.api import RunContext
    from benchmark.registry import METHODS
    from datasets.cohorts.base import Fold
    from datasets.tissue import TISSUE_PRESETS, TissueParams

    monkeypatch.setitem(TISSUE_PRESETS, "tiny", TissueParams(seg_downsample=4, a_t=0.01, a_h=0.001))
    checkpoint = runs["root"] / "whole" / CHECKPOINT_NAME
    method = METHODS.create("pixel_mamba", epochs=1, effective_batch=2, tissue_preset="tiny")
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False, weights=str(checkpoint))
    out = method.run_fold(tiny_cohort, tiny_cohort.task("colour"), Fold(0, train=("p0", "p1"), val=("p2", "p3")), seed=0, ctx=ctx)
    assert out.weights == f"pretrained:{checkpoint}"
    assert out.info["weights_unused"] == ["head.fc.bias", "head.fc.weight"]
    assert "head.classifier.weight" in out.info["weights_new"] and not any(k.startswith("layers.") for k in out.info["weights_new"])
    assert out.predictions["patient_id"].tolist() == ["p2", "p3"]
    assert np.isfinite(out.predictions[["prob_0", "prob_1"]].to_numpy()).all()


# ---- the data stream ---------------------------------------------------------------------------
def images_per_step(batch_size, world_size, start=0, epoch=1):
    """The (index, seed) items of each optimizer step, over all ranks, of 50 images in steps of 8."""
    steps = None
    for rank in range(world_size):
        sampler = StepSampler(50, 8, batch_size, rank, world_size, seed=3)
        sampler.set_position(epoch, start)
        items = list(sampler)
        assert len(items) == len(sampler)
        per_step = 8 // world_size  # this rank's micro-batches of one step
        chunks = [items[i:i + per_step] for i in range(0, len(items), per_step)]
        steps = chunks if steps is None else [a + b for a, b in zip(steps, chunks)]
    return [sorted(step) for step in steps]


def test_each_step_has_the_same_images_on_any_gpu_layout_and_from_any_start():
    one_gpu = images_per_step(batch_size=4, world_size=1)  # 2 micro-batches per step
    assert len(one_gpu) == 50 // 8
    assert len({index for step in one_gpu for index, _ in step}) == 48  # no image twice; the rest dropped
    assert images_per_step(batch_size=2, world_size=2) == one_gpu == images_per_step(batch_size=4, world_size=2)
    assert images_per_step(batch_size=4, world_size=1, start=4) == one_gpu[4:]
    assert images_per_step(batch_size=4, world_size=1, epoch=2) != one_gpu


def test_augmentation_draws_from_its_own_seed_and_leaves_the_global_generators_alone(tmp_path):
    from torchvision.datasets import ImageFolder

    data = write_image_folder(tmp_path / "data", n_train=1, n_val=1)
    dataset = SeededTransformDataset(ImageFolder(str(data / "train")), train_transform(tiny_config(data, tmp_path)))
    random.seed(7)
    torch.manual_seed(7)
    first, label = dataset[(0, 11)]
    assert random.random() == random.Random(7).random()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(first, dataset[(0, 11)][0]) and label == 0
    assert not torch.equal(first, dataset[(0, 12)][0])


# ---- the recipe ----------------------------------------------------------------------------------
def test_paper_recipe_defaults_and_schedule():
    cfg = PretrainConfig(data="x")
    assert (cfg.img_size, cfg.epochs, cfg.global_batch, cfg.lr, cfg.weight_decay, cfg.beta1) == (224, 300, 1024, 1e-3, 0.05, 0.9)
    assert cfg.mixup > 0 and cfg.smoothing > 0 and cfg.reprob > 0 and cfg.accumulation(world_size=8) == 1
    assert PretrainConfig(data="x", batch_size=64).accumulation(world_size=4) == 4
    model = create_model(PretrainConfig(data="x", img_size=32), num_classes=3)
    optimizer = create_optimizer(cfg, model)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {name: id(p) in decayed for name, p in model.named_parameters()}
    assert names["layers.3.mixer.in_proj.weight"] and not names["layers.3.mixer.A_log"]
    assert not names["layers.3.norm.weight"] and not names["head.fc.bias"]
    schedule = create_scheduler(cfg, optimizer, steps_per_epoch=100)  # warm-up 5 epochs, cosine to 300
    lrs = {}
    for step in (0, 250, 500, 15_000, 30_000):
        schedule.step_update(step)
        lrs[step] = optimizer.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(1e-6) and lrs[250] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lrs[500] == pytest.approx(1e-3, rel=1e-3) and lrs[30_000] == pytest.approx(1e-5)
    assert lrs[15_000] == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * 15_000 / 30_000)) / 2)


# ---- command line --------------------------------------------------------------------------------
def test_user_errors_get_one_line_messages(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", n_train=1, n_val=1)
    cases = [
        (["--data", str(tmp_path / "missing")], "train does not exist"),
        (["--data", str(data), "--img-size", "100"], "multiple of 32"),
        (["--data", str(data), "--global-batch", "10", "--batch-size", "4"], "not a multiple of --batch-size"),
        (["--data", str(data), "--global-batch", "8", "--batch-size", "4", "--img-size", "32"], "fewer than one --global-batch"),
        (["--data", str(data), "--batch-size", "3", "--global-batch", "3"], "even size"),
    ]
    for argv, message in cases:
        assert main(argv + ["--out", str(tmp_path / "out"), "--device", "cpu", "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    (data / "val" / "red").rename(data / "val" / "purple")
    with pytest.raises(ValueError, match="different classes"):
        pretrain(tiny_config(data, tmp_path / "out", global_batch=2, batch_size=2))


def test_bench_reports_images_per_second_and_gpu_days(capsys):
    argv = ["--bench", "--model", "pixel_mamba_6m", "--batch-size", "2", "--img-size", "32", "--bench-steps", "1",
            "--bench-warmup", "0", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["batch_size"] == 2 and result["images_per_s"] > 0
    assert result["gpu_days"] == pytest.approx(300 * IMAGENET_TRAIN_IMAGES / result["images_per_s"] / 86400)


# ---- several processes ---------------------------------------------------------------------------
def _pretrain_rank(rank: int, world_size: int, port: int, cfg: PretrainConfig) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # this child process's own setting
    pretrain(cfg)


@pytest.mark.slow  # two processes start torch: about 20 s on 2 idle cores
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """DDP over gloo: 2 ranks x 1 image x 2 micro-batches give the weights of 1 process x 2 x 2 (mixup,
    which pairs images inside a micro-batch, is off), and validation counts every image once."""
    import socket

    import torch.multiprocessing as mp

    data = write_image_folder(tmp_path / "data")
    settings = dict(epochs=1, mixup=0.0, cutmix=0.0)
    one = pretrain(tiny_config(data, tmp_path / "one", **settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_pretrain_rank, args=(2, port, tiny_config(data, tmp_path / "two", batch_size=1, **settings)), nprocs=2)
    single = load_checkpoint(tmp_path / "one" / CHECKPOINT_NAME)
    double = load_checkpoint(tmp_path / "two" / CHECKPOINT_NAME)
    assert double["step"] == single["step"] == 2
    for name, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][name], tensor, rtol=1e-4, atol=2e-5, msg=name)
    assert double["history"][0]["top1"] == one["history"][0]["top1"]
    assert double["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-4)
