"""The bag trainer shared by every MIL aggregator: one bag (one patient) per step, Adam, a fixed
number of epochs, optional gradient accumulation, and no checkpoint selection on the reported fold.

Optional early stopping uses an inner validation split drawn from the training bags only. With a seed,
runs on the CPU repeat exactly: the model is built after `torch.manual_seed(seed)` and the bag order of
each epoch comes from a generator seeded with it."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm.auto import tqdm

from methods.losses import survival_risk, task_loss


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters as plain data (part of each job's config hash)."""

    epochs: int
    lr: float = 2e-4
    weight_decay: float = 1e-5
    grad_accum: int = 1  # bags per optimiser step
    dropout: float = 0.25
    early_stopping: bool = False  # on an inner split of the training patients, never the reported fold
    inner_val_fraction: float = 0.2
    patience: int = 10

    def capped(self, max_epochs: int | None) -> "Recipe":
        return self if max_epochs is None else replace(self, epochs=min(self.epochs, max_epochs))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Bag:
    """One sample: a patient's instances (its slides' patch features, concatenated) and its target.

    features: (N, D) float32, or a function that loads them (bags too large to keep in memory).
    target: {'label': ()} for classification, {'bin': (), 'censored': ()} for survival."""

    patient_id: str
    features: torch.Tensor | Callable[[], torch.Tensor]
    target: dict[str, torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.features() if callable(self.features) else self.features


@contextmanager
def single_thread_on_cpu(device: str) -> Iterator[None]:
    """One intra-op thread while a bag model trains or predicts on the CPU, restored afterwards.

    One bag per step means small ops, where a second thread gains little on an idle machine and costs
    much when the cores are shared: measured on our 2-core machines with other processes busy, an ABMIL
    step took 6 ms on one thread and 177 ms on two, a MambaMIL step (300 instances) 1.3-1.7 s and 5.7-11.7 s."""
    if not device.startswith("cpu"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_bags(model: nn.Module, bags: list[Bag], kind: str, recipe: Recipe, seed: int, device: str = "cpu",
               progress: bool = False) -> dict:
    """Train `model` in place on `bags`. Returns what happened (epochs run, last mean loss, ...)."""
    if not bags:
        raise ValueError("no training bags: every training patient lacks features; check the quarantine file")
    with single_thread_on_cpu(device):
        return _train(model, bags, kind, recipe, seed, device, progress)


def _train(model, bags, kind, recipe, seed, device, progress) -> dict:
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train, inner_val = split_inner(bags, kind, recipe, seed)
    best = (math.inf, None, 0)  # inner-val loss, state, epoch
    info: dict = {"epochs_run": 0, "train_bags": len(train), "inner_val_bags": len(inner_val)}
    epochs = tqdm(range(recipe.epochs), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        info["train_loss"] = run_epoch(model, train, kind, optimizer, recipe.grad_accum, generator, device)
        info["epochs_run"] = epoch + 1
        epochs.set_postfix(loss=f"{info['train_loss']:.4f}")
        if inner_val:
            val_loss = mean_loss(model, inner_val, kind, device)
            if val_loss < best[0]:
                best = (val_loss, copy.deepcopy(model.state_dict()), epoch + 1)
            elif epoch + 1 - best[2] >= recipe.patience:
                break
    if best[1] is not None:
        model.load_state_dict(best[1])
        info.update(best_epoch=best[2], inner_val_loss=best[0])
    return info


def split_inner(bags: list[Bag], kind: str, recipe: Recipe, seed: int) -> tuple[list[Bag], list[Bag]]:
    """(train, inner validation) drawn from the training bags only; no inner split without early stopping."""
    if not recipe.early_stopping:
        return bags, []
    strata = [int(b.target["label"]) if kind == "classification" else int(1 - b.target["censored"]) for b in bags]
    counts = np.bincount(strata)
    stratify = strata if counts[counts > 0].min() >= 2 else None
    index = np.arange(len(bags))
    train_idx, val_idx = train_test_split(index, test_size=recipe.inner_val_fraction, random_state=seed, stratify=stratify)
    return [bags[i] for i in sorted(train_idx)], [bags[i] for i in sorted(val_idx)]


def run_epoch(model, bags, kind, optimizer, grad_accum, generator, device) -> float:
    """One pass over the bags in a seeded random order; loss / grad_accum, a step every grad_accum bags
    and one for the remainder at the end of the epoch."""
    model.train()
    order = torch.randperm(len(bags), generator=generator).tolist()
    total = 0.0
    optimizer.zero_grad()
    for step, i in enumerate(order, start=1):
        loss = bag_loss(model, bags[i], kind, device)
        (loss / grad_accum).backward()
        total += loss.item()
        if step % grad_accum == 0 or step == len(order):
            optimizer.step()
            optimizer.zero_grad()
    return total / len(order)


def bag_loss(model, bag: Bag, kind: str, device: str) -> torch.Tensor:
    logits = model(bag.load().to(device, non_blocking=True).float())
    target = {k: v.view(1).to(device) for k, v in bag.target.items()}
    return task_loss(kind, logits, target)


@torch.no_grad()
def mean_loss(model, bags, kind, device) -> float:
    model.eval()
    return float(np.mean([bag_loss(model, bag, kind, device).item() for bag in bags]))


@torch.no_grad()
def predict_bags(model: nn.Module, bags: list[Bag], kind: str, device: str = "cpu") -> np.ndarray:
    """Classification: (n, K) softmax probabilities. Survival: (n,) risk = -sum S (higher = worse)."""
    model.to(device).eval()
    out = []
    with single_thread_on_cpu(device):
        for bag in bags:
            logits = model(bag.load().to(device).float())
            out.append(torch.softmax(logits.float(), dim=1)[0] if kind == "classification" else survival_risk(logits)[0])
    return torch.stack(out).cpu().numpy() if out else np.zeros((0,))
