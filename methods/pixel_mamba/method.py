"""Pixel-Mamba trained end to end on slides: the registered methods `pixel_mamba` (6M) and
`pixel_mamba_21m` (shared PIXEL_MAMBA.md section 8).

Two protocols:
- "slide" (default): one sample = one patient; its bag is the tissue regions of all its slides' 2.5x
  tissue images (slide stage product "lowres"), concatenated in slide order, each in zigzag scan order.
- "regions" (the paper's CAMELYON16 protocol): per slide, `n_regions` random `region_size` squares at
  `region_magnification` from tissue, each scored by the model; the slide's probability is the vote
  (mean probability or majority) and a patient's the mean over its slides. Training draws
  `train_regions` fresh regions per slide and epoch, each carrying its slide's label.
Recipe: AdamW, cosine schedule from `lr` per optimizer step, fixed epochs (no selection on the reported
fold), gradient accumulation to `effective_batch` samples per optimizer step, bf16 autocast on CUDA.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from benchmark import checkpoint, distributed
from benchmark.api import FoldOutput, Method, RunContext
from benchmark.registry import METHODS
from datasets.cohorts.base import Cohort, Fold, Task
from methods.losses import loss_targets, survival_risk, task_loss
from methods.pixel_mamba.model import PixelMamba, pixel_mamba
from methods.pixel_mamba.token_ops import cut_regions, zigzag_region_order
from methods.pixel_mamba.weights import load_weights
from methods.precision import bf16_autocast
from methods.predictions import prediction_rows, train_risk_median
from methods.ssm.mixer import no_weight_decay_names

log = logging.getLogger(__name__)

REGION_SIZE = 32  # pixels per side of a model region: the last token's receptive field in both tables
REGIONS_PER_READ = 8  # regions protocol: random regions read from a slide at once


@dataclass
class PixelMambaConfig:
    """[S]: the paper's recipe; [D]: our choice where the paper is silent (shared PIXEL_MAMBA.md)."""

    size: str = "6m"  # "6m" | "21m" (layer table)
    preset: str = "paper"  # "paper" | "demo": DEMO_PRESET under the explicit overrides
    epochs: int = 100  # [S]; capped by --max-epochs
    lr: float = 4e-4  # [S] peak of the cosine schedule (one value per optimizer step, down to 0)
    weight_decay: float = 0.05  # [D] the ImageNet recipe's
    effective_batch: int = 64  # [S] model inputs per optimizer step over all GPUs (1 per GPU and micro-step)
    accumulation: int | None = None  # micro-steps per GPU and optimizer step; None: effective_batch / GPUs
    alpha: float = 0.8  # [D] region fusion: fraction of regions fused away over the 24 layers
    d_state: int = 16  # [D] mixer
    d_conv: int = 4
    expand: int = 2
    pool_hidden: int = 128  # [D] attention pooling width
    dropout: float = 0.0  # [D] before the classifier
    checkpoint_layers: bool = False  # activation checkpointing per layer (memory for time)
    protocol: str = "slide"  # "slide" | "regions" (CAMELYON16)
    tissue_preset: str | None = None  # a name in datasets.tissue.TISSUE_PRESETS; None: the cohort's own
    lowres_mpp: float = 4.0  # slide protocol: input scale, um/px (2.5x)
    min_tissue: float = 0.25  # [D] tissue fraction for a 32-px region to enter the model
    n_regions: int = 100  # [S] regions protocol: regions scored per slide
    train_regions: int = 1  # [D] regions protocol: regions per training slide and epoch
    region_size: int = 2048  # [S] regions protocol: side in pixels at region_magnification
    region_magnification: float = 20  # [S]
    vote: str = "mean"  # "mean" probability | "majority" vote over a slide's regions
    weights: str | None = None  # none | PATH | hf:REPO[/FILE]; --weights overrides it

    def __post_init__(self) -> None:
        choices = {"size": ("6m", "21m"), "preset": ("paper", "demo"), "protocol": ("slide", "regions"),
                   "vote": ("mean", "majority")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"pixel_mamba: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.region_size % REGION_SIZE:
            raise ValueError(f"pixel_mamba: region_size must be a multiple of {REGION_SIZE}, got {self.region_size}")


# The synthetic demo (~40 patients, 2.5x images of ~25k tissue pixels, 5 folds on 2 CPU cores in about
# 5 minutes; measurements in docs/pixel_mamba.md): the slides at 1.25x (a quarter of the tokens), half
# the region fusion (with ~10 regions a slide, alpha 0.8 leaves 2 regions from layer 9 on and learned
# too slowly), 2 epochs with an optimizer step per patient. AUC 0.975 +- 0.050 on metastasis.
DEMO_PRESET: dict[str, Any] = {"lowres_mpp": 8.0, "alpha": 0.4, "epochs": 2, "effective_batch": 1}


def effective_batch(cfg: PixelMambaConfig, world_size: int) -> int:
    """Model inputs per optimizer step over all GPUs: `effective_batch` whatever the number of GPUs
    (each GPU then accumulates effective_batch / GPUs micro-steps), or `accumulation` x GPUs when the
    accumulation is fixed instead."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    return cfg.accumulation * world_size if cfg.accumulation else cfg.effective_batch


@dataclass
class Sample:
    """One training or scoring unit: a patient (slide protocol) or a slide (regions protocol)."""

    patient_id: str
    sources: list  # lowres product paths (slide) or (wsi path, tissue product) pairs (regions)
    target: dict[str, torch.Tensor]
    n_inputs: int = 1  # model inputs per training epoch


class PixelMambaMethod(Method):
    # what an out-of-memory job is retried with under --retry-oom
    oom_retry_overrides = {"checkpoint_layers": True}

    def __init__(self, name: str, cfg: PixelMambaConfig):
        self.name = name
        self.cfg = cfg
        self._products: dict[str, Any] | None = None
        self._default_mpp: float | None = None

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    # ---- slide products -------------------------------------------------------------------------
    def prepare(self, cohort: Cohort, ctx: RunContext) -> None:
        from datasets.lowres import LowresParams  # slide stage: imported when used (openslide)
        from datasets.preprocess import preprocess_slides
        from datasets.quarantine import Quarantine
        from datasets.tissue import TISSUE_PRESETS

        if self.cfg.tissue_preset is not None and self.cfg.tissue_preset not in TISSUE_PRESETS:
            raise ValueError(f"pixel_mamba: tissue_preset must be one of {', '.join(TISSUE_PRESETS)}, got {self.cfg.tissue_preset!r}")
        self._default_mpp = ctx.default_mpp
        products = ("tissue",) if self.cfg.protocol == "regions" else ("tissue", "lowres")
        quarantine = Quarantine(ctx.out_dir / "quarantine" / f"{cohort.name}.csv")
        self._products = preprocess_slides(  # writes the quarantine file itself
            cohort.slides[["slide_id", "path"]], ctx.cache_dir, products=products,
            tissue=TISSUE_PRESETS[self.cfg.tissue_preset] if self.cfg.tissue_preset else cohort.tissue_params(),
            lowres=LowresParams(mpp=self.cfg.lowres_mpp, region_size=REGION_SIZE, min_tissue=self.cfg.min_tissue),
            workers=ctx.num_workers, default_mpp=ctx.default_mpp, strict=ctx.strict, progress=ctx.progress,
            quarantine=quarantine,
        )

    def _sources(self, slide_ids: list[str], paths: list[str]) -> tuple[list, list[str]]:
        """The usable inputs of a patient's slides, and the slides that have none."""
        sources, missing = [], []
        for slide_id, path in zip(slide_ids, paths):
            product = self._products.get(slide_id)
            if self.cfg.protocol == "regions" and product is not None and product.tissue is not None:
                sources.append((Path(path), product.tissue))
            elif self.cfg.protocol == "slide" and product is not None and product.lowres is not None:
                sources.append(product.lowres)
            else:
                missing.append(slide_id)
        return sources, missing

    # ---- one fold ----------------------------------------------------------------------------------
    def run_fold(self, cohort: Cohort, task: Task, fold: Fold, seed: int, ctx: RunContext) -> FoldOutput:
        if self.cfg.protocol == "regions" and task.kind != "classification":
            raise ValueError("pixel_mamba: the regions protocol scores slides for classification; use protocol=slide")
        if self._products is None:
            self.prepare(cohort, ctx)
        samples = cohort.samples(task).set_index("patient_id")
        targets, _ = loss_targets(samples, task, fold.train)
        by_partition, missing = {}, []
        for partition, patients in fold.partitions().items():
            by_partition[partition] = []
            for patient in patients:
                sources, lost = self._sources(samples.at[patient, "slide_ids"], samples.at[patient, "paths"])
                missing += lost
                n_inputs = 1 if self.cfg.protocol == "slide" else self.cfg.train_regions * len(sources)
                by_partition[partition].append(Sample(patient, sources, targets[patient], n_inputs))
        train = [s for s in by_partition["train"] if s.sources]
        if not train:
            raise RuntimeError(f"pixel_mamba: no training patient of fold {fold.index} has a usable slide; see the quarantine file")

        torch.manual_seed(seed)
        device = torch.device(ctx.device)
        world = distributed.world()
        model = self._build(task).to(device)
        weights_label, weights_info = load_weights(model, ctx.weights if ctx.weights is not None else self.cfg.weights)
        epochs = min(self.cfg.epochs, ctx.max_epochs) if ctx.max_epochs else self.cfg.epochs
        started = time.perf_counter()
        history = train_model(model, train, task.kind, self._train_inputs, epochs=epochs, lr=self.cfg.lr,
                              weight_decay=self.cfg.weight_decay, effective_batch=effective_batch(self.cfg, world.size),
                              seed=seed, device=device, job_dir=ctx.job_dir, world=world)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        scored = [(partition, sample) for partition in ("val", "test") for sample in by_partition.get(partition, [])]
        unscored = [sample.patient_id for _, sample in scored if not sample.sources]  # left out of the scoring
        scored = [(partition, sample) for partition, sample in scored if sample.sources]
        scores = self._score_all(model, [sample for _, sample in scored], task, device, seed, world)
        # float64 score columns, as Pixel-Mamba has always written them (two_stage's stay float32)
        predictions = prediction_rows([sample.patient_id for _, sample in scored], [partition for partition, _ in scored],
                                      samples, task, np.asarray(scores, dtype=np.float64))
        timings = {"train_s": train_s * world.size, "n_train_slides": epochs * sum(len(s.sources) for s in train),
                   "infer_s": (time.perf_counter() - started) * world.size,
                   "n_infer_slides": sum(len(sample.sources) for _, sample in scored)}
        extra = {}
        if task.kind == "survival":  # the leaderboard's Kaplan-Meier split, from training patients only
            extra["train_risk_median"] = train_risk_median(self._score_all(model, train, task, device, seed, world))
        info = {"epochs": epochs, "train_loss": history, "body_parameters": model.body_parameters(),
                "patients_without_slides": unscored, "world_size": world.size, "timings": timings, **extra,
                **weights_info}
        return FoldOutput(predictions, weights_label, missing_slides=missing, info=info)

    def _build(self, task: Task) -> PixelMamba:
        c = self.cfg
        return pixel_mamba(c.size, task.n_classes, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand,
                           alpha=c.alpha, pool_hidden=c.pool_hidden, dropout=c.dropout,
                           checkpoint_layers=c.checkpoint_layers)

    # ---- inputs ------------------------------------------------------------------------------------
    def _train_inputs(self, sample: Sample, rng: np.random.Generator) -> list[Callable[[], torch.Tensor]]:
        """Loaders of the model inputs one training sample gives in one epoch (one per micro-step).
        Random draws happen here, in the same order on every rank; the reading happens on the rank
        that gets the input."""
        if self.cfg.protocol == "slide":
            return [lambda: patient_pixels(sample.sources)]
        seeds = [(wsi_path, tissue, int(rng.integers(2**31)))
                 for wsi_path, tissue in sample.sources for _ in range(self.cfg.train_regions)]
        return [lambda w=w, t=t, s=s: next(iter(self._random_region_pixels(w, t, 1, s))) for w, t, s in seeds]

    def _score_all(self, model: PixelMamba, to_score: list[Sample], task: Task, device: torch.device, seed: int,
                   world: distributed.World) -> list[np.ndarray]:
        """`_score` of each sample, in order; the ranks of a multi-GPU job score a share each."""
        mine = distributed.shard(list(enumerate(to_score)), world)
        done = distributed.gather([(i, self._score(model, sample, task, device, seed)) for i, sample in mine], world)
        return [score for _, score in sorted(done, key=lambda pair: pair[0])]

    def _score(self, model: PixelMamba, sample: Sample, task: Task, device: torch.device, seed: int) -> np.ndarray:
        """Class probabilities (classification) or risk (survival) of one patient."""
        if self.cfg.protocol == "slide":
            logits = predict_logits(model, [patient_pixels(sample.sources)], device)[0]
            return survival_risk(logits[None]).numpy() if task.kind == "survival" else torch.softmax(logits, 0).numpy()
        slide_probs = []
        for wsi_path, tissue in sample.sources:
            slide_seed = seed * 2**32 + zlib.crc32(Path(wsi_path).name.encode())  # fixed per slide and seed
            regions = self._random_region_pixels(wsi_path, tissue, self.cfg.n_regions, slide_seed)
            probs = torch.softmax(torch.stack(predict_logits(model, regions, device)), dim=1).numpy()
            slide_probs.append(vote(probs, self.cfg.vote))
        return np.mean(slide_probs, axis=0)

    def _random_region_pixels(self, wsi_path: Path, tissue: Path, n: int, seed: int) -> Iterator[torch.Tensor]:
        """`n` random regions of the slide as model inputs, read a few at a time (a 2048-px region is
        12 MB, a slide's 100 of them 1.2 GB)."""
        from datasets.lowres import random_regions, tissue_mask
        from datasets.slides import MAGNIFICATION_MPP, WSI

        if self.cfg.region_magnification not in MAGNIFICATION_MPP:
            raise ValueError(f"pixel_mamba: region_magnification must be one of {sorted(MAGNIFICATION_MPP)}")
        mpp = MAGNIFICATION_MPP[self.cfg.region_magnification]
        with WSI.open(wsi_path, default_mpp=self._default_mpp) as wsi:
            mask = tissue_mask(tissue, wsi)  # once per slide, not per read
            for start in range(0, n, REGIONS_PER_READ):
                count = min(REGIONS_PER_READ, n - start)
                for image in random_regions(wsi, mask, count, self.cfg.region_size, mpp, seed=seed * 1_000_003 + start):
                    yield torch.from_numpy(image_region_pixels(image, self.cfg.min_tissue))


# ---- data helpers ----------------------------------------------------------------------------------
def patient_pixels(lowres_paths: list) -> torch.Tensor:
    """The tissue regions (n, 32, 32, 3) uint8 of a patient's slides: each slide in zigzag scan order,
    the slides one after the other."""
    from datasets.lowres import TissueImage

    parts = []
    for path in lowres_paths:
        image = TissueImage.load(path)
        if image.region_size != REGION_SIZE:
            raise ValueError(f"{path}: tissue image regions are {image.region_size} px; Pixel-Mamba needs {REGION_SIZE}: rebuild with region_size={REGION_SIZE}")
        regions = np.asarray(image.regions).reshape(-1, 2)
        parts.append(cut_regions(image.image, regions[zigzag_region_order(regions)], REGION_SIZE))
    return torch.from_numpy(np.concatenate(parts))


def tissue_fraction(pixels: np.ndarray, saturation_threshold: int = 8) -> np.ndarray:
    """Per region (n, R, R, 3) uint8, the fraction of pixels whose HSV saturation exceeds the threshold
    (CLAM's tissue criterion, shared BASELINES.md section 1, without its blur and contours)."""
    rgb = pixels.astype(np.int32)
    saturation = (rgb.max(-1) - rgb.min(-1)) * 255 / np.maximum(rgb.max(-1), 1)
    return (saturation > saturation_threshold).mean(axis=(1, 2))


def image_region_pixels(image: np.ndarray, min_tissue: float) -> np.ndarray:
    """A square image cut into 32-px regions in zigzag order, background regions left out (all of
    them kept if none reaches `min_tissue`: the image was centred in tissue)."""
    grid = image.shape[0] // REGION_SIZE, image.shape[1] // REGION_SIZE
    cells = np.stack(np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)
    pixels = cut_regions(image, cells[zigzag_region_order(cells)], REGION_SIZE)
    tissue = tissue_fraction(pixels) >= min_tissue
    return pixels[tissue] if tissue.any() else pixels


def vote(region_probs: np.ndarray, how: str) -> np.ndarray:
    """A slide's class probabilities from its regions': the mean, or each class's share of the votes."""
    if how == "mean":
        return region_probs.mean(axis=0)
    votes = np.bincount(region_probs.argmax(axis=1), minlength=region_probs.shape[1])
    return votes / votes.sum()


# ---- training --------------------------------------------------------------------------------------
def train_model(
    model: PixelMamba,
    samples: list[Sample],
    kind: str,
    inputs: Callable[[Sample, np.random.Generator], list[Callable[[], torch.Tensor]]],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    effective_batch: int,
    seed: int,
    device: torch.device,
    job_dir: Path | None = None,
    world: distributed.World | None = None,
) -> list[float]:
    """AdamW with a cosine schedule per optimizer step; each step averages the gradients of
    `effective_batch` model inputs, spread over the ranks of `world` (benchmark.distributed.train_steps:
    the same weights whatever the number of GPUs). Samples are shuffled each epoch by a generator
    seeded alike on every rank; `inputs` gives a sample's `n_inputs` input loaders. The state is saved
    after each epoch in `job_dir` and a rerun resumes from it (benchmark.checkpoint).
    Returns the mean training loss of each epoch."""
    world = world or distributed.world()
    rng = np.random.default_rng(seed)
    per_epoch = sum(sample.n_inputs for sample in samples)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * math.ceil(per_epoch / effective_batch))
    start, extra = checkpoint.resume(job_dir, model=model, optimizer=optimizer, scheduler=schedule, rng=rng)
    history = list(extra.get("history", []))
    if start:
        log.info("resumed after epoch %d/%d from %s", start, epochs, job_dir)
    trained = distributed.wrap_model(model, world)

    def loss_fn(m: nn.Module, item: tuple[Sample, Callable[[], torch.Tensor]]) -> torch.Tensor:
        sample, load = item
        with bf16_autocast(device):
            logits = m(load().to(device))
        return task_loss(kind, logits.float(), {k: v.view(1).to(device) for k, v in sample.target.items()})

    model.train()
    for epoch in range(start, epochs):
        items = [(samples[i], load) for i in rng.permutation(len(samples)) for load in inputs(samples[i], rng)]
        if len(items) != per_epoch:
            raise RuntimeError(f"pixel_mamba: an epoch gave {len(items)} model inputs, expected {per_epoch}")
        history.append(distributed.train_steps(trained, items, loss_fn, optimizer, effective_batch, world,
                                               on_step=schedule.step))
        checkpoint.save(job_dir, epoch + 1, model=model, optimizer=optimizer, scheduler=schedule, rng=rng,
                        extra={"history": history})
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, epochs, history[-1])
    return history


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and the parameters Mamba marks (A_log, D), as Vim/DeiT train."""
    from timm.optim import param_groups_weight_decay  # timm only when training: not on every CLI start

    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=sorted(no_weight_decay_names(model)))


@torch.no_grad()
def predict_logits(model: PixelMamba, inputs, device: torch.device) -> list[torch.Tensor]:
    """Logits (n_classes,) float32 on the CPU for each model input."""
    model.eval()
    out = []
    for pixels in inputs:
        with bf16_autocast(device):
            out.append(model(pixels.to(device))[0].float().cpu())
    return out


# ---- registration ----------------------------------------------------------------------------------
def _create(name: str, size: str, overrides: dict[str, Any]) -> PixelMambaMethod:
    if "size" in overrides:
        raise ValueError(f"{name}: the size is fixed by the method name; use pixel_mamba or pixel_mamba_21m")
    known = {f.name for f in dataclasses.fields(PixelMambaConfig)} - {"size"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if overrides.get("preset") == "demo":
        overrides = {**DEMO_PRESET, **overrides}
    return PixelMambaMethod(name, PixelMambaConfig(size=size, **overrides))


@METHODS.register("pixel_mamba", "Pixel-Mamba 6M: end-to-end Mamba over the pixels of the 2.5x slide",
                  family="end-to-end", pretrained=False)
def pixel_mamba_6m_method(**overrides) -> PixelMambaMethod:
    return _create("pixel_mamba", "6m", overrides)


@METHODS.register("pixel_mamba_21m", "Pixel-Mamba 21M: end-to-end Mamba over the pixels of the 2.5x slide",
                  family="end-to-end", pretrained=False)
def pixel_mamba_21m_method(**overrides) -> PixelMambaMethod:
    return _create("pixel_mamba_21m", "21m", overrides)
