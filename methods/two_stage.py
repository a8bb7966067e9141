"""Two-stage methods: frozen patch encoder -> cached patch features -> MIL aggregator trained per fold.

    r50_abmil, r50_mambamil, r50_meanpool, r50_maxpool   ResNet-50-trunc, 256 px patches at 20x
    conch_abmil, conch_mambamil                          CONCH v1, 512 px patches at 20x (TRIDENT's)

prepare() runs the slide stage (tissue, patch grid) and feature extraction once per cohort (cached and
shared by every method with the same encoder and patches); run_fold() builds one bag per patient (its
slides' features concatenated, slides in slide_id order, patches in row-major order), trains the
aggregator on fold.train with the recipe below and predicts fold.val (and fold.test).

Recipes (shared BASELINES.md sections 3-4): Adam lr 2e-4, weight decay 1e-5, dropout 0.25, one bag per
step. Classification: 50 epochs (CLAM allows 200 with early stopping on the validation fold, which would
select on the reported fold; we fix the count instead). Survival: MCAT's protocol, 20 epochs, gradient
accumulation 32, 4-bin NLL (alpha 0), bins from the fold's training patients. No checkpoint selection;
early stopping only on an inner split of the training patients, and off by default.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmark.api import FoldOutput, Method, RunContext
from benchmark.registry import AGGREGATORS, METHODS
from datasets.cohorts.base import Cohort, Fold, Task
from datasets.patches import PatchParams
from datasets.quarantine import Quarantine
from datasets.tissue import TISSUE_PRESETS, TissueParams
from methods.encoders import weights_provenance
from methods.losses import loss_targets
from methods.mil import Bag, Recipe, predict_bags, train_bags
from methods.predictions import prediction_rows, train_risk_median

RECIPES = {
    "classification": Recipe(epochs=50, lr=2e-4, weight_decay=1e-5, grad_accum=1, dropout=0.25),
    "survival": Recipe(epochs=20, lr=2e-4, weight_decay=1e-5, grad_accum=32, dropout=0.25),
}
RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))

# `--preset demo`: the synthetic cohort on 2 CPU cores. CONCH at 224 px as CLAM feeds it (ViT-B at 448
# is about 1 patch/s on 2 cores); recipes unchanged (--max-epochs caps them).
PRESETS = {"demo": {"conch_input_size": 224}}

# Bags of a fold larger than this (float32 bytes) are read from disk at each step instead of kept.
IN_MEMORY_BYTES = 4 * 2**30


def tissue_params(tissue) -> TissueParams | None:
    """None: the cohort's own preset (Cohort.tissue_preset)."""
    if tissue is None or isinstance(tissue, TissueParams):
        return tissue
    if tissue in TISSUE_PRESETS:
        return TISSUE_PRESETS[tissue]
    raise ValueError(f"unknown tissue preset '{tissue}'; choose from {', '.join(TISSUE_PRESETS)}")


class TwoStageMethod(Method):
    """A patch encoder + a MIL aggregator. Settings come from the registration and `--set KEY=VALUE`:
    input_size (encoder), tissue (preset), features_dir (user-made CLAM/TRIDENT h5 files instead of
    extraction), batch_size (extraction), and the recipe fields (epochs, lr, weight_decay, grad_accum,
    dropout, early_stopping, inner_val_fraction, patience), applied to both task kinds."""

    def __init__(self, name: str, encoder: str, aggregator: str, patch_size: int, magnification: float = 20,
                 input_size: int | None = None, tissue: str | TissueParams | None = None, features_dir: str | None = None,
                 batch_size: int = 128, preset: str | None = None, **recipe_overrides):
        unknown = set(recipe_overrides) - set(RECIPE_KEYS)
        if unknown:
            raise ValueError(f"{name} has no setting {sorted(unknown)}; settings: input_size, tissue, features_dir, "
                             f"batch_size, preset, {', '.join(RECIPE_KEYS)}")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset '{preset}'; presets: {', '.join(PRESETS)}")
            if encoder == "conch_v1" and input_size is None:
                input_size = PRESETS[preset]["conch_input_size"]
        self.name, self.encoder, self.aggregator = name, encoder, aggregator
        self.patch = PatchParams(magnification=magnification, patch_size=patch_size)
        self.input_size, self.tissue = input_size, tissue_params(tissue)
        self.features_dir = Path(features_dir) if features_dir else None
        self.batch_size, self.preset = batch_size, preset
        self.recipes = {kind: dataclasses.replace(recipe, **recipe_overrides) for kind, recipe in RECIPES.items()}

    def config(self) -> dict:
        return {
            "encoder": self.encoder,
            "aggregator": self.aggregator,
            "patch": dataclasses.asdict(self.patch),
            "input_size": self.input_size,
            "tissue": dataclasses.asdict(self.tissue) if self.tissue else "cohort preset",
            "features_dir": str(self.features_dir) if self.features_dir else None,
            "recipes": {kind: recipe.as_dict() for kind, recipe in self.recipes.items()},
        }

    # ------------------------------------------------------------------ slide products and features

    def prepare(self, cohort: Cohort, ctx: RunContext) -> None:
        if self.features_dir is not None:
            if not self.features_dir.is_dir():
                raise FileNotFoundError(f"features_dir {self.features_dir} is not a folder of <slide_id>.h5 files")
            return
        from methods.features import extract_slides  # imported when used: `python -m methods.features` runs it

        quarantine = Quarantine(Path(ctx.out_dir) / "quarantine" / f"{cohort.name}.csv")
        extract_slides(cohort.slides[["slide_id", "path"]], Path(ctx.cache_dir), self.encoder, weights=ctx.weights,
                       input_size=self.input_size, patch=self.patch, tissue=self.tissue or cohort.tissue_params(), device=ctx.device,
                       batch_size=self.batch_size, num_workers=ctx.num_workers, default_mpp=ctx.default_mpp,
                       progress=ctx.progress, strict=ctx.strict, quarantine=quarantine)

    def feature_files(self, cohort: Cohort, ctx: RunContext) -> dict[str, Path]:
        """slide_id -> h5 of the slides that have features (made by prepare, or user-made)."""
        if self.features_dir is not None:
            candidates = {s: [self.features_dir / f"{s}.h5", self.features_dir / "h5_files" / f"{s}.h5"]
                          for s in cohort.slides["slide_id"]}
        else:
            from methods.features import feature_folder

            folder = feature_folder(ctx.cache_dir, self.encoder, ctx.weights, self.input_size, self.patch)
            candidates = {s: [folder / f"{s}.h5"] for s in cohort.slides["slide_id"]}
        return {s: next(p for p in paths if p.is_file()) for s, paths in candidates.items() if any(p.is_file() for p in paths)}

    def weights(self, files: dict[str, Path], ctx: RunContext) -> str:
        if self.features_dir is None:
            return weights_provenance(self.encoder, ctx.weights)
        from methods.features import feature_attrs

        made = feature_attrs(next(iter(files.values()))).get("encoder_weights") if files else None
        return made or f"pretrained:features_dir:{self.features_dir}"

    # ------------------------------------------------------------------ one fold

    def run_fold(self, cohort: Cohort, task: Task, fold: Fold, seed: int, ctx: RunContext) -> FoldOutput:
        files = self.feature_files(cohort, ctx)
        samples = cohort.samples(task).set_index("patient_id")
        parts = fold.partitions()
        wanted = [s for p in (pid for ids in parts.values() for pid in ids) for s in samples.loc[p, "slide_ids"]]
        missing_slides = sorted(s for s in wanted if s not in files)
        recipe = self.recipes[task.kind].capped(ctx.max_epochs)
        targets, edges = loss_targets(samples, task, fold.train)
        bags = {part: self.bags(ids, samples, files, targets) for part, ids in parts.items()}
        without = sorted(p for part in ("val", "test") if part in parts for p in parts[part]
                         if p not in {b.patient_id for b in bags[part]})

        torch.manual_seed(seed)
        in_dim = bags["train"][0].load().shape[1] if bags["train"] else 0
        model = AGGREGATORS.create(self.aggregator, in_dim=in_dim, n_classes=task.n_classes, dropout=recipe.dropout)
        started = time.perf_counter()
        info = train_bags(model, bags["train"], task.kind, recipe, seed, ctx.device, ctx.progress)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        predictions = pd.concat([self.predict(model, bags[part], part, samples, task, ctx.device)
                                 for part in ("val", "test") if part in parts], ignore_index=True)
        infer_s = time.perf_counter() - started
        if task.kind == "survival":  # the leaderboard's Kaplan-Meier split, from training patients only
            info["train_risk_median"] = train_risk_median(predict_bags(model, bags["train"], task.kind, ctx.device))
        n_slides = lambda bs: sum(len(samples.loc[b.patient_id, "slide_ids"]) for b in bs)  # noqa: E731
        info.update(
            patients_without_slides=without,
            recipe=recipe.as_dict(),
            survival_bin_edges=edges,
            timings={"train_s": train_s, "n_train_slides": n_slides(bags["train"]) * max(info["epochs_run"], 1),
                     "infer_s": infer_s, "n_infer_slides": sum(n_slides(bags[p]) for p in ("val", "test") if p in parts)},
        )
        return FoldOutput(predictions, self.weights(files, ctx), missing_slides, info)

    @staticmethod
    def bags(patients, samples: pd.DataFrame, files: dict[str, Path],
             targets: dict[str, dict[str, torch.Tensor]]) -> list[Bag]:
        """One bag per patient with at least one feature file; in memory unless the fold is too large."""
        chosen = []
        for pid in patients:
            paths = [files[s] for s in sorted(samples.loc[pid, "slide_ids"]) if s in files]
            if paths:
                chosen.append((pid, paths))
        in_memory = sum(feature_bytes(paths) for _, paths in chosen) <= IN_MEMORY_BYTES
        bags = []
        for pid, paths in chosen:
            features = patient_features(paths) if in_memory else partial(patient_features, paths)
            bags.append(Bag(pid, features, targets[pid]))
        return bags

    @staticmethod
    def predict(model, bags: list[Bag], part: str, samples: pd.DataFrame, task: Task, device: str) -> pd.DataFrame:
        """The rows of one partition, with predict_bags' float32 scores."""
        scores = predict_bags(model, bags, task.kind, device)
        return prediction_rows([b.patient_id for b in bags], part, samples, task, scores)


def patient_features(paths: list[Path]) -> torch.Tensor:
    from methods.features import load_features

    return torch.cat([load_features(p)[0] for p in paths])


def feature_bytes(paths: list[Path]) -> int:
    import h5py

    total = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            total += int(np.prod(f["features"].shape)) * 4
    return total


# ---------------------------------------------------------------------------------- registrations

R50 = {"encoder": "resnet50_trunc", "patch_size": 256}
CONCH = {"encoder": "conch_v1", "patch_size": 512}
REGISTERED = {
    "r50_abmil": (R50, "abmil", "ResNet-50-trunc features (256 px, 20x) + CLAM gated ABMIL"),
    "r50_mambamil": (R50, "mambamil", "ResNet-50-trunc features (256 px, 20x) + MambaMIL (SRMamba, rate 5)"),
    "conch_abmil": (CONCH, "abmil", "CONCH v1 features (512 px, 20x) + CLAM gated ABMIL"),
    "conch_mambamil": (CONCH, "mambamil", "CONCH v1 features (512 px, 20x) + MambaMIL (SRMamba, rate 5)"),
    "r50_meanpool": (R50, "meanpool", "ResNet-50-trunc features + mean pooling MIL (sanity row)"),
    "r50_maxpool": (R50, "maxpool", "ResNet-50-trunc features + max pooling MIL (sanity row)"),
}


def register(name: str, defaults: dict, aggregator: str, description: str) -> None:
    def factory(**overrides) -> TwoStageMethod:
        return TwoStageMethod(name=name, aggregator=aggregator, **{**defaults, **overrides})

    METHODS.add(name, factory, description, family="two-stage", pretrained=True)


for _name, (_defaults, _aggregator, _description) in REGISTERED.items():
    register(_name, _defaults, _aggregator, _description)
