"""CLAM's gated-attention MIL (CLAM_SB without instance clustering), shared BASELINES.md section 3.

Module and parameter names follow CLAM's (attention_net.{0,3}, attention_a/b/c, classifiers), so a
CLAM_SB checkpoint's bag-level parts load into it."""
from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import AGGREGATORS

SIZES = {"small": (512, 256), "big": (512, 384)}


def xavier_init(module: nn.Module) -> None:
    """CLAM's and MambaMIL's initialisation: Xavier-normal linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GatedAttention(nn.Module):
    """Attention score per instance: w^T (tanh(V h) * sigmoid(U h))  (Ilse et al. 2018, gated)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))  # (N, 1)


class ABMIL(nn.Module):
    """bag (N, in_dim) -> logits (1, n_classes). Linear(in_dim, 512)-ReLU-Dropout; gated attention
    (hidden 256, or 384 for size 'big'); softmax over instances; attention-weighted sum; Linear."""

    def __init__(self, in_dim: int, n_classes: int, size: str = "small", dropout: float = 0.25):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"ABMIL size must be one of {', '.join(SIZES)}, got '{size}'")
        width, hidden = SIZES[size]
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout), GatedAttention(width, hidden, dropout)
        )
        self.classifiers = nn.Linear(width, n_classes)
        xavier_init(self)

    def forward(self, bag: torch.Tensor, return_attention: bool = False):
        h = self.attention_net[:3](bag)
        scores = self.attention_net[3](h).transpose(0, 1)  # (1, N)
        weights = torch.softmax(scores, dim=1)
        logits = self.classifiers(weights @ h)
        return (logits, weights) if return_attention else logits


@AGGREGATORS.register("abmil", "CLAM's gated attention MIL (CLAM_SB without instance clustering): 512 -> 256, dropout 0.25")
def abmil(in_dim: int, n_classes: int, dropout: float = 0.25) -> ABMIL:
    return ABMIL(in_dim, n_classes, "small", dropout)


@AGGREGATORS.register("abmil_big", "CLAM's gated attention MIL, 'big' size: 512 -> 384, dropout 0.25")
def abmil_big(in_dim: int, n_classes: int, dropout: float = 0.25) -> ABMIL:
    return ABMIL(in_dim, n_classes, "big", dropout)
