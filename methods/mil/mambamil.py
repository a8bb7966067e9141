"""MambaMIL (Yang et al., MICCAI 2024) with SRMamba, shared BASELINES.md section 3.

Module names follow the authors' (_fc1, layers.i.{0,1}, norm, attention, classifier). The SRMamba
layer comes from our SSM op layer (methods.ssm.mixer), which runs on the CPU through our PyTorch
selective scan and on the GPU through mamba_ssm's kernels when installed."""
from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import AGGREGATORS
from methods.mil.abmil import xavier_init


class MambaMIL(nn.Module):
    """bag (N, in_dim) -> logits (1, n_classes). Instances in the bag's order (row-major patches)."""

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.25, d_model: int = 512, n_layers: int = 2,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, rate: int = 5):
        super().__init__()
        from methods.ssm.mixer import SRMambaMixer

        self._fc1 = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d_model), SRMambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, rate=rate))
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.attention = nn.Sequential(nn.Linear(d_model, 128), nn.Tanh(), nn.Linear(128, 1))
        self.classifier = nn.Linear(d_model, n_classes)
        # the authors apply Xavier-normal to every Linear, the mixer's projections included
        xavier_init(self)

    def forward(self, bag: torch.Tensor, return_attention: bool = False):
        h = self._fc1(bag).unsqueeze(0)  # (1, N, d_model)
        for layer in self.layers:
            h = h + layer(h)
        h = self.norm(h)
        weights = torch.softmax(self.attention(h).transpose(1, 2), dim=-1)  # (1, 1, N)
        logits = self.classifier((weights @ h).squeeze(0))  # (1, n_classes)
        return (logits, weights.squeeze(0)) if return_attention else logits


@AGGREGATORS.register("mambamil", "MambaMIL: 2 x (x + SRMamba(LayerNorm x)), d_model 512, d_state 16, rate 5; attention pooling")
def mambamil(in_dim: int, n_classes: int, dropout: float = 0.25, rate: int = 5) -> MambaMIL:
    return MambaMIL(in_dim, n_classes, dropout=dropout, rate=rate)
