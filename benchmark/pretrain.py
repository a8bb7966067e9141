"""ImageNet-1K pretraining of Pixel-Mamba, the paper's first step (shared PIXEL_MAMBA.md section 8).

    python -m benchmark.pretrain --data DIR --model pixel_mamba_6m            # one GPU or the CPU
    torchrun --nproc-per-node 8 -m benchmark.pretrain --data DIR --model pixel_mamba_21m
    python -m benchmark.pretrain --bench --model pixel_mamba_6m --batch-size 128  # images/s, GPU-days

DIR has the ImageFolder layout: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG. The recipe is the
paper's, built from timm's pieces: random-resized crop, horizontal flip, random erasing, mixup with
label smoothing (soft-target cross-entropy), AdamW with weight decay 0.05, a cosine schedule from 1e-3
with warm-up, 300 epochs, 1024 images per optimizer step (= --batch-size per GPU x GPUs x accumulation).
bf16 autocast on GPU. Top-1/top-5 on val after each epoch, a TensorBoard log in OUT/tb.

Resuming: OUT/checkpoint.pt (model, optimizer, scheduler, epoch, step, RNG states; written atomically
after every epoch and every --save-every steps) is picked up by a rerun with the same --out. The data
stream is a function of (seed, epoch, position): the order of an epoch is a seeded permutation, each
image's augmentation draws from its own seed, and each mixup from the step's, so a resumed run
continues exactly where the interrupted one was, even mid-epoch and on another number of GPUs (then
only the mixup pairing within a micro-batch differs).

At the end OUT/model/ holds model.safetensors, config.json and a model card (README.md);
--push-to-hub OWNER/NAME uploads it (a local path copies it). `pixel_mamba` fine-tuning takes it with
--weights OUT/model/model.safetensors, OUT/checkpoint.pt or hf:OWNER/NAME (the body is loaded, the head
is new).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from benchmark import checkpoint, distributed
from methods.pixel_mamba.classifier import MODEL_SIZES, PixelMambaClassifier, pixel_mamba_classifier
from methods.precision import bf16_autocast

log = logging.getLogger("benchmark.pretrain")

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1K train split, for the GPU-days estimate
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class PretrainConfig:
    """[S]: the paper's supplement; [D]: our choice where it is silent (DeiT / Vision Mamba values)."""

    data: str = ""  # ImageFolder root with train/ and val/
    model: str = "pixel_mamba_6m"  # pixel_mamba_6m | pixel_mamba_21m
    out: str = ""  # run folder; default runs/pretrain/<model>
    img_size: int = 224  # [S]; a multiple of 32 (a small size for smoke tests)
    epochs: int = 300  # [S]
    global_batch: int = 1024  # [S] images per optimizer step over all GPUs
    batch_size: int = 128  # [D] images per GPU and micro-step; accumulation fills global_batch
    lr: float = 1e-3  # [S] peak of the cosine schedule
    min_lr: float = 1e-5  # [D]
    warmup_epochs: float = 5  # [D]
    warmup_lr: float = 1e-6  # [D]
    weight_decay: float = 0.05  # [S] (not on norms, biases, A_log, D)
    beta1: float = 0.9  # [S]
    beta2: float = 0.999  # [D]
    smoothing: float = 0.1  # [S] label smoothing; [D] its value
    mixup: float = 0.8  # [S] mixup; [D] its alpha
    cutmix: float = 0.0  # [D] the paper lists mixup only
    reprob: float = 0.25  # [S] random erasing; [D] its probability (pixel mode)
    scale_min: float = 0.08  # [D] random-resized crop area range (scale_min, 1)
    color_jitter: float = 0.0  # [D] not in the paper's list
    auto_augment: str = ""  # [D] not in the paper's list (e.g. rand-m9-mstd0.5-inc1 for DeiT's)
    alpha: float = 0.8  # region fusion, as the WSI model
    checkpoint_layers: bool = False  # activation checkpointing (memory for time)
    seed: int = 0
    workers: int = 8  # data-loading processes per GPU
    device: str = "auto"  # auto | cpu | cuda
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints (0: at the end of epochs only)
    max_steps: int = 0  # stop (with a checkpoint) after this many optimizer steps in all (0: no limit)
    resume: str = "auto"  # auto (OUT/checkpoint.pt if present) | none | PATH
    log_every: int = 20  # optimizer steps between TensorBoard points
    progress: bool = True
    push_to_hub: str = ""  # OWNER/NAME or a local folder, after the last epoch

    def __post_init__(self) -> None:
        if self.model not in MODEL_SIZES:
            raise ValueError(f"--model {self.model}: choose one of {', '.join(MODEL_SIZES)}")
        if self.img_size <= 0 or self.img_size % 32:
            raise ValueError(f"--img-size {self.img_size}: Pixel-Mamba needs a multiple of 32 (its region size)")
        if min(self.epochs, self.global_batch, self.batch_size) < 1:
            raise ValueError("--epochs, --global-batch and --batch-size must be >= 1")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"--batch-size {self.batch_size}: mixup pairs images within a batch; use an even size")
        self.out = self.out or str(Path("runs") / "pretrain" / self.model)

    def recipe(self) -> dict[str, Any]:
        """The settings that define the training (what a resumed run must share, what the card shows)."""
        skip = {"data", "out", "batch_size", "workers", "device", "save_every", "max_steps", "resume",
                "log_every", "progress", "push_to_hub"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def accumulation(self, world_size: int) -> int:
        per_step = self.batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(f"--global-batch {self.global_batch} is not a multiple of --batch-size {self.batch_size} x "
                             f"{world_size} GPU(s); change one of them")
        return self.global_batch // per_step


# ---- distributed ----------------------------------------------------------------------------------
def setup_distributed(device: str) -> tuple[distributed.World, torch.device]:
    """One process per GPU from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process;
    and this process's device (its local rank's GPU, or the CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible; use --device cpu")
    world = distributed.init_from_env(device)
    return world, torch.device("cuda", world.local_rank) if device == "cuda" else torch.device("cpu")


# ---- data -----------------------------------------------------------------------------------------
def sample_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run a block with python's, numpy's and torch's CPU generators seeded, then restore them: timm's
    augmentations draw from the global generators, and this makes each draw a function of its seed."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededTransformDataset(Dataset):
    """An ImageFolder whose items are `(index, seed)`: the image is augmented with its own seed."""

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image, label = self.folder[index]
        with seeded_rngs(seed):
            return self.transform(image), label


class StepSampler(Sampler):
    """This rank's `(index, seed)` items of an epoch from a given optimizer step on.

    The epoch is a seeded permutation cut into global batches of `global_batch` images (the remainder
    is dropped); global batch t is split into `accumulation` micro-steps of `world_size` x `batch_size`
    images, rank r taking the r-th block of each. So the images of a step do not depend on the number
    of GPUs, and a run can start at any step."""

    def __init__(self, n_images: int, global_batch: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.n, self.global_batch, self.batch_size = n_images, global_batch, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = n_images // global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch)))
        per_micro = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.global_batch // per_micro):
                first = step * self.global_batch + micro * per_micro + self.rank * self.batch_size
                for index in order[first:first + self.batch_size].tolist():
                    yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.global_batch // self.world_size


def image_folders(cfg: PretrainConfig):
    """The train and val ImageFolders (without transforms); their classes must agree."""
    from torchvision.datasets import ImageFolder

    root = Path(cfg.data).expanduser()
    folders = []
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} does not exist; --data needs an ImageFolder root with train/ and val/ "
                                    "(one subfolder of images per class)")
        try:
            folders.append(ImageFolder(str(root / split)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{root / split}: {err}; put each class's images in its own subfolder") from None
    train, val = folders
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise ValueError(f"{root}: train/ and val/ have different classes (e.g. {', '.join(missing)}); give both the same class folders")
    return train, val


def train_transform(cfg: PretrainConfig):
    from timm.data import create_transform

    return create_transform(cfg.img_size, is_training=True, scale=(cfg.scale_min, 1.0), hflip=0.5,
                            color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
                            interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel", re_count=1)


def eval_transform(img_size: int):
    """Resize to img_size / 0.875, centre crop img_size (timm's / DeiT's evaluation)."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=0.875)


def eval_loader(root: Path, img_size: int, batch_size: int, workers: int = 0, world: distributed.World | None = None,
                pin_memory: bool = False) -> DataLoader:
    """This rank's share (every world.size-th image, nothing padded) of an ImageFolder, evaluation transform."""
    from torchvision.datasets import ImageFolder

    world = world or distributed.World()
    dataset = ImageFolder(str(root), transform=eval_transform(img_size))
    share = Subset(dataset, range(world.rank, len(dataset), world.size))
    return DataLoader(share, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)


# ---- model, optimizer, schedule, loss -------------------------------------------------------------
def create_model(cfg: PretrainConfig, num_classes: int) -> PixelMambaClassifier:
    torch.manual_seed(cfg.seed)
    return pixel_mamba_classifier(cfg.model, num_classes, alpha=cfg.alpha, checkpoint_layers=cfg.checkpoint_layers)


def create_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; timm keeps norms, biases and the model's no_weight_decay() names out of weight decay."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))


def create_scheduler(cfg: PretrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Cosine from lr to min_lr over all optimizer steps, after a linear warm-up from warmup_lr."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr,
                             warmup_t=round(cfg.warmup_epochs * steps_per_epoch), warmup_lr_init=cfg.warmup_lr,
                             t_in_epochs=False)


def create_mixup(cfg: PretrainConfig, num_classes: int):
    """timm's Mixup (which also smooths the labels), or None when mixup and cutmix are off."""
    from timm.data import Mixup

    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=num_classes)


def create_criterion(cfg: PretrainConfig, mixup) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()


# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             world: distributed.World | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and cross-entropy over the loader (summed over ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with bf16_autocast(device):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                               nn.functional.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(len(labels), device=device)]).double()
    if world is not None and world.size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty: put images in val/<class>/")
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count}


# ---- checkpoints ----------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of benchmark.pretrain; pass --resume none or another --out")
    return state


def checkpoint_to_resume(cfg: PretrainConfig) -> Path | None:
    if cfg.resume == "none":
        return None
    path = Path(cfg.out) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume).expanduser()
    if cfg.resume != "auto" and not path.is_file():
        raise FileNotFoundError(f"--resume {cfg.resume} does not exist; pass a checkpoint.pt, auto or none")
    return path if path.is_file() else None


def check_resumable(state: dict[str, Any], cfg: PretrainConfig, classes: list[str], path: Path) -> None:
    differ = sorted(k for k, v in cfg.recipe().items() if state["config"].get(k) != v)
    if differ:
        details = ", ".join(f"{k}: {state['config'].get(k)} -> {getattr(cfg, k)}" for k in differ[:4])
        raise ValueError(f"{path} is a run with other settings ({details}); use the same settings, another --out, or --resume none")
    if state["classes"] != classes:
        raise ValueError(f"{path} was trained on other classes than {cfg.data}; use another --out or --resume none")


# ---- training -------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one process holds during training."""

    cfg: PretrainConfig
    world: distributed.World
    device: torch.device
    model: PixelMambaClassifier  # the bare model (its state is what checkpoints hold)
    wrapped: nn.Module  # DDP around it, or itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    classes: list[str]
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0  # optimizer steps done
    history: list = dataclasses.field(default_factory=list)  # one dict per evaluated epoch

    def state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "rng": checkpoint.random_states(), "config": dataclasses.asdict(self.cfg), "classes": self.classes,
                "history": self.history}

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        self.scheduler.step_update(self.step)
        checkpoint.set_random_states(state["rng"])

    def save(self) -> None:
        if self.world.is_main:
            checkpoint.atomic_save(self.state(), Path(self.cfg.out) / CHECKPOINT_NAME)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train (or resume, or finish) the run in cfg.out. Returns {"status": "done" | "stopped", "step",
    "epoch", "history", "model_dir" (when done), "pushed" (when pushed)}."""
    launcher_group = distributed.world().size > 1  # a launcher's process group: leave it to the launcher
    world, device = setup_distributed(cfg.device)
    try:
        return _pretrain(cfg, world, device)
    finally:
        if not launcher_group:
            distributed.shutdown()


def _pretrain(cfg: PretrainConfig, world: distributed.World, device: torch.device) -> dict[str, Any]:
    accumulation = cfg.accumulation(world.size)
    train_folder, val_folder = image_folders(cfg)
    if len(train_folder) < cfg.global_batch:
        raise ValueError(f"{cfg.data}/train has {len(train_folder)} images, fewer than one --global-batch of {cfg.global_batch}")
    model = create_model(cfg, len(train_folder.classes)).to(device)
    wrapped = distributed.wrap_model(model, world)
    sampler = StepSampler(len(train_folder), cfg.global_batch, cfg.batch_size, world.rank, world.size, cfg.seed)
    optimizer = create_optimizer(cfg, model)
    run = Run(cfg, world, device, model, wrapped, optimizer, create_scheduler(cfg, optimizer, sampler.steps_per_epoch),
              list(train_folder.classes), sampler.steps_per_epoch)
    resume_from = checkpoint_to_resume(cfg)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        check_resumable(state, cfg, run.classes, resume_from)
        run.load(state)
        if world.is_main:
            log.info("resumed %s at epoch %d, step %d", resume_from, run.epoch + 1, run.step)
    train_loader = DataLoader(SeededTransformDataset(train_folder, train_transform(cfg)), batch_size=cfg.batch_size,
                              sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                              persistent_workers=cfg.workers > 0)
    val_loader = eval_loader(Path(val_folder.root), cfg.img_size, cfg.batch_size, cfg.workers, world,
                             pin_memory=device.type == "cuda")
    mixup = create_mixup(cfg, len(run.classes))
    criterion = create_criterion(cfg, mixup)
    writer = _tensorboard(cfg, run.step) if world.is_main else None
    try:
        while run.epoch < cfg.epochs:
            if not _train_epoch(run, sampler, train_loader, mixup, criterion, accumulation, writer):
                return {"status": "stopped", "step": run.step, "epoch": run.epoch, "history": run.history}
            metrics = evaluate(model, val_loader, device, world)  # the bare model: ranks' shares differ in length
            run.history.append({"epoch": run.epoch + 1, "step": run.step, **metrics})
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(f"val/{name}", value, run.step)
                writer.flush()
                log.info("epoch %d/%d: val top-1 %.2f%%, top-5 %.2f%%, loss %.4f", run.epoch + 1, cfg.epochs,
                         metrics["top1"], metrics["top5"], metrics["loss"])
            run.epoch += 1
            run.save()
    finally:
        if writer is not None:
            writer.close()
    return _finish(run)


def _tensorboard(cfg: PretrainConfig, step: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(cfg.out) / "tb"), purge_step=step or None)  # a resumed run overwrites what followed


def _train_epoch(run: Run, sampler: StepSampler, loader: DataLoader, mixup, criterion, accumulation: int, writer) -> bool:
    """Train from the run's position to the end of its epoch; False if max_steps stopped it first."""
    from tqdm import tqdm

    cfg = run.cfg
    start = run.step - run.epoch * run.steps_per_epoch
    sampler.set_position(run.epoch, start)
    run.wrapped.train()
    batches = iter(loader)
    bar = tqdm(total=run.steps_per_epoch, initial=start, desc=f"epoch {run.epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and run.world.is_main), dynamic_ncols=True)
    tic, images_seen = time.perf_counter(), 0
    with bar:
        for _ in range(start, run.steps_per_epoch):
            loss = _optimizer_step(run, batches, mixup, criterion, accumulation)
            run.step += 1
            run.scheduler.step_update(run.step)
            images_seen += cfg.global_batch
            lr = run.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            if writer is not None and (run.step % cfg.log_every == 0 or run.step == 1):
                elapsed = time.perf_counter() - tic
                writer.add_scalar("train/loss", loss, run.step)
                writer.add_scalar("train/lr", lr, run.step)
                writer.add_scalar("train/images_per_s", images_seen / elapsed, run.step)
                tic, images_seen = time.perf_counter(), 0
            if cfg.max_steps and run.step >= cfg.max_steps:
                run.save()
                return False
            if cfg.save_every and run.step % cfg.save_every == 0:
                run.save()
    return True


def _optimizer_step(run: Run, batches: Iterator, mixup, criterion, accumulation: int) -> float:
    """One optimizer step over `accumulation` micro-batches; returns the mean training loss (this rank)."""
    device, total = run.device, 0.0
    for micro in range(accumulation):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup is not None:
            with seeded_rngs(sample_seed(run.cfg.seed, run.step, micro, run.world.rank)):
                images, labels = mixup(images, labels)
        last = micro == accumulation - 1
        sync = contextlib.nullcontext() if last or run.world.size == 1 else run.wrapped.no_sync()
        with sync:
            with bf16_autocast(device):
                logits = run.wrapped(images)
            loss = criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the training loss is {loss.item()} at step {run.step + 1}; lower --lr or raise --warmup-epochs")
            (loss / accumulation).backward()
        total += loss.item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / accumulation


def _finish(run: Run) -> dict[str, Any]:
    """Write the model folder (and push it) once all epochs are done."""
    from methods.pixel_mamba.hub import is_local_repo, push_to_hub, write_model_folder

    result = {"status": "done", "step": run.step, "epoch": run.epoch, "history": run.history}
    if not run.world.is_main:
        return result
    cfg = run.cfg
    metrics = {k: run.history[-1][k] for k in ("epoch", "top1", "top5", "loss")} if run.history else {}
    config = {"model": cfg.model, "num_classes": len(run.classes), "classes": run.classes, "img_size": cfg.img_size,
              "alpha": cfg.alpha, "recipe": {**cfg.recipe(), "dataset": Path(cfg.data).name, "steps": run.step},
              "metrics": {f"val_{k}" if k != "epoch" else k: v for k, v in metrics.items()},
              "repo": None if not cfg.push_to_hub or is_local_repo(cfg.push_to_hub) else cfg.push_to_hub}
    result["model_dir"] = str(write_model_folder(Path(cfg.out) / "model", run.model.state_dict(), config))
    if cfg.push_to_hub:
        result["pushed"] = push_to_hub(Path(result["model_dir"]), cfg.push_to_hub)
        log.info("pushed %s to %s", result["model_dir"], result["pushed"])
    return result


# ---- device measurement ---------------------------------------------------------------------------
def bench(cfg: PretrainConfig, steps: int = 20, warmup: int = 5, num_classes: int = 1000) -> dict[str, Any]:
    """Images/s of pretraining steps (forward, backward, AdamW; bf16 on GPU) on synthetic images of
    cfg.img_size at cfg.batch_size, one device, no data loading; and the GPU-days that 300 epochs
    (cfg.epochs) of ImageNet-1K take at that speed."""
    _, device = setup_distributed(cfg.device)
    model = create_model(cfg, num_classes).to(device)
    optimizer = create_optimizer(cfg, model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), generator=generator).to(device)

    def step() -> None:
        with bf16_autocast(device):
            logits = model(images)
        criterion(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - tic
    ips = steps * cfg.batch_size / seconds
    gpu_days = cfg.epochs * IMAGENET_TRAIN_IMAGES / ips / 86400
    return {"model": cfg.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_size": cfg.batch_size, "img_size": cfg.img_size, "steps": steps, "images_per_s": ips,
            "seconds_per_step": seconds / steps, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "epochs": cfg.epochs, "gpu_days": gpu_days, "days_on_8_gpus_if_linear": gpu_days / 8,
            "body_parameters": sum(p.numel() for p in model.layers.parameters())}


# ---- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, argparse.Namespace]:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmark.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(PretrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "model":
            parser.add_argument(flag, default=default, choices=sorted(MODEL_SIZES))
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--bench", action="store_true", help="time synthetic pretraining steps instead of training")
    parser.add_argument("--bench-steps", type=int, default=20)
    parser.add_argument("--bench-warmup", type=int, default=5)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    if not args.bench and not values["data"]:
        parser.error("--data DIR is required (an ImageFolder root with train/ and val/), or pass --bench")
    return PretrainConfig(**values), args


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
        if args.bench:
            result = bench(cfg, steps=args.bench_steps, warmup=args.bench_warmup)
            print(f"{result['model']} on {result['device']}: {result['images_per_s']:.1f} images/s at batch "
                  f"{result['batch_size']} ({result['img_size']}px); {result['epochs']} epochs of ImageNet-1K: "
                  f"{result['gpu_days']:.1f} GPU-days ({result['days_on_8_gpus_if_linear']:.1f} days on 8 GPUs if linear)")
            print(json.dumps(result))
            return 0
        result = pretrain(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["status"] == "stopped":
        print(f"stopped after step {result['step']} (--max-steps); rerun the same command to continue")
    elif "model_dir" in result:
        print(f"done: {result['model_dir']}" + (f", pushed to {result['pushed']}" if "pushed" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
