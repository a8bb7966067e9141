"""Mean and max pooling MIL: sanity rows (how much does attention add over plain pooling?)."""
from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import AGGREGATORS
from methods.mil.abmil import xavier_init


class PoolMIL(nn.Module):
    """bag (N, in_dim) -> Linear(in_dim, 512)-ReLU-Dropout -> mean or max over instances -> Linear."""

    def __init__(self, in_dim: int, n_classes: int, mode: str, dropout: float = 0.25, width: int = 512):
        super().__init__()
        if mode not in ("mean", "max"):
            raise ValueError(f"pooling mode must be 'mean' or 'max', got '{mode}'")
        self.mode = mode
        self.fc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(width, n_classes)
        xavier_init(self)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.fc(bag)
        pooled = h.mean(dim=0, keepdim=True) if self.mode == "mean" else h.max(dim=0, keepdim=True).values
        return self.classifier(pooled)


@AGGREGATORS.register("meanpool", "Linear-ReLU per instance, mean over the bag, Linear (sanity row)")
def meanpool(in_dim: int, n_classes: int, dropout: float = 0.25) -> PoolMIL:
    return PoolMIL(in_dim, n_classes, "mean", dropout)


@AGGREGATORS.register("maxpool", "Linear-ReLU per instance, max over the bag, Linear (sanity row)")
def maxpool(in_dim: int, n_classes: int, dropout: float = 0.25) -> PoolMIL:
    return PoolMIL(in_dim, n_classes, "max", dropout)
