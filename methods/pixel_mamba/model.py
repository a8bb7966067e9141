"""Pixel-Mamba: pixel tokens of a slide at 2.5x through 24 bidirectional Mamba layers (shared
PIXEL_MAMBA.md). Each layer: `x + Mixer(RMSNorm(x))` over the zigzag-serialised sequence, then region
fusion, then the layer's token expansion. Head: norm -> size-aware attention pooling -> linear.

    model = pixel_mamba_6m(n_classes=2)
    logits = model(pixels)   # pixels: (n_regions, 32, 32, 3) RGB values 0..255, regions in scan order
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.encoders.base import IMAGENET_MEAN, IMAGENET_STD  # the paper pretrains on ImageNet-1K: its input statistics
from methods.pixel_mamba.layers import TABLES, LayerSpec, output_shape
from methods.pixel_mamba.token_ops import deserialize, fusion_schedule, region_fusion, serialize, token_expansion
from methods.ssm.mixer import BiMambaMixer

NORM_EPS = 1e-5  # Vision Mamba's RMSNorm epsilon


class Block(nn.Module):
    """Pre-norm residual Mamba block on the flat sequence (1, L, C)."""

    def __init__(self, channels: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        self.norm = nn.RMSNorm(channels, eps=NORM_EPS)
        self.mixer = BiMambaMixer(channels, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return seq + self.mixer(self.norm(seq))


class AttentionPoolHead(nn.Module):
    """norm -> attention pooling whose logits get + log(size) (proportional attention: a region that
    stands for s input regions weighs as s of them) -> linear."""

    def __init__(self, channels: int, n_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(channels, eps=NORM_EPS)
        self.attention = nn.Sequential(nn.Linear(channels, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, n_classes)

    def forward(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        logits = self.attention(x).squeeze(-1).float() + torch.log(sizes.float())
        weights = torch.softmax(logits, dim=0).to(x.dtype)
        return self.classifier(self.dropout(weights @ x)).unsqueeze(0)


class PixelMambaBody(nn.Module):
    """The layers, shared by the WSI model and the ImageNet classifier (classifier.py) under the same
    parameter names (`layers.{i}.*`), so a pretrained classifier's body loads into the WSI model. Each
    model says how its input becomes normalised regions (`regions`) and adds its own head."""

    def __init__(self, table: tuple[LayerSpec, ...], d_state: int, d_conv: int, expand: int, alpha: float,
                 checkpoint_layers: bool):
        super().__init__()
        self.table = table
        self.alpha = alpha
        self.checkpoint_layers = checkpoint_layers
        self.region_size = output_shape(table[-1])[0][0]
        self.layers = nn.ModuleList(Block(spec.channels, d_state, d_conv, expand) for spec in table)

    def regions(self, inputs: torch.Tensor) -> torch.Tensor:
        """The normalised regions of the input: one bag [n, R, R, 3] (a slide) or a batch of bags
        [B, n, R, R, 3] (images, each fused as a slide of n regions)."""
        raise NotImplementedError

    def features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final region tokens [..., n', C_last] and their sizes [..., n'] (summing to n in each bag)."""
        x = self.regions(inputs)  # the only reference: the input regions are freed by layer 1's fusion
        sizes = torch.ones(x.shape[:-3], device=x.device)
        schedule = fusion_schedule(x.shape[-4], self.alpha, len(self.layers))
        for spec, block, k in zip(self.table, self.layers, schedule):
            seq = serialize(x)
            if self.checkpoint_layers and torch.is_grad_enabled():
                seq = checkpoint(block, seq, use_reentrant=False)
            else:
                seq = block(seq)
            x, sizes = region_fusion(deserialize(seq, x.shape), sizes, k)
            if spec.te is not None:
                x = token_expansion(x, spec.te)
        return x.flatten(-3), sizes


class PixelMamba(PixelMambaBody):
    def __init__(
        self,
        table: tuple[LayerSpec, ...],
        n_classes: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        alpha: float = 0.8,
        pool_hidden: int = 128,
        dropout: float = 0.0,
        checkpoint_layers: bool = False,
    ):
        super().__init__(table, d_state, d_conv, expand, alpha, checkpoint_layers)
        self.head = AttentionPoolHead(output_shape(table[-1])[1], n_classes, pool_hidden, dropout)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN) * 255, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD) * 255, persistent=False)

    def body_parameters(self) -> int:
        return sum(p.numel() for p in self.layers.parameters())

    def regions(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (n, R, R, 3), RGB 0..255 -> normalised (n, R, R, 3): the model's one bag."""
        n, height, width, _ = pixels.shape
        if n == 0:
            raise ValueError("a slide without tissue regions cannot be scored: check its tissue mask")
        if (height, width) != (self.region_size, self.region_size):
            raise ValueError(f"Pixel-Mamba regions are {self.region_size}x{self.region_size} pixels, got {height}x{width}")
        return (pixels.float() - self.pixel_mean) / self.pixel_std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (1, n_classes) of one bag of regions (n, R, R, 3), RGB 0..255, in scan order."""
        return self.head(*self.features(pixels))


def pixel_mamba(size: str, n_classes: int, **kwargs) -> PixelMamba:
    if size not in TABLES:
        raise ValueError(f"unknown Pixel-Mamba size '{size}'; choose one of {', '.join(TABLES)}")
    return PixelMamba(TABLES[size], n_classes, **kwargs)


def pixel_mamba_6m(n_classes: int, **kwargs) -> PixelMamba:
    return pixel_mamba("6m", n_classes, **kwargs)


def pixel_mamba_21m(n_classes: int, **kwargs) -> PixelMamba:
    return pixel_mamba("21m", n_classes, **kwargs)
