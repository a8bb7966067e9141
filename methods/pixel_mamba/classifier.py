"""Pixel-Mamba as an ImageNet classifier: the pretraining model of the paper (shared PIXEL_MAMBA.md
section 8). Its body is the WSI model's body, layer for layer and with the same parameter names
(`layers.{i}.norm.*`, `layers.{i}.mixer.*`), so a pretraining checkpoint loads into `pixel_mamba`
fine-tuning with `--weights PATH` and only the head is new.

An image is a small slide: a 224 x 224 image is a 7 x 7 grid of 32 x 32 regions, taken in the same
region-based zigzag order, through the WSI model's own layer loop (`PixelMambaBody.features`). Images
are batched (the WSI model takes one bag at a time); every image of a batch has the same number of
regions, so region fusion merges the same number of regions in each and the batch stays a tensor.

    model = pixel_mamba_classifier("pixel_mamba_6m", num_classes=1000)
    logits = model(images)   # images: (B, 3, H, W) normalised with the ImageNet mean/std (timm's
                             # transforms), H and W multiples of 32; logits: (B, num_classes)

Input scale matches the WSI model: it normalises RGB 0..255 by 255 x the same ImageNet mean/std.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from methods.pixel_mamba.layers import TABLES, output_shape
from methods.pixel_mamba.model import NORM_EPS, PixelMambaBody
from methods.pixel_mamba.token_ops import zigzag_region_order
from methods.ssm.mixer import no_weight_decay_names

MODEL_SIZES = {"pixel_mamba_6m": "6m", "pixel_mamba_21m": "21m"}


class PoolingHead(nn.Module):
    """norm -> size-weighted mean of the final region tokens -> linear.

    The norm has the WSI head's name and shape (`head.norm`): fine-tuning starts from it; `head.fc`
    has no counterpart in the WSI model (whose classifier is `head.classifier`), so the WSI
    classifier and attention pooling are always new, whatever the number of classes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.RMSNorm(channels, eps=NORM_EPS)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """tokens (B, n, C), sizes (B, n) -> logits (B, num_classes)."""
        weights = (sizes / sizes.sum(dim=1, keepdim=True)).to(tokens.dtype)
        pooled = torch.einsum("bn,bnc->bc", weights, self.norm(tokens))
        return self.fc(pooled)


class PixelMambaClassifier(PixelMambaBody):
    def __init__(
        self,
        size: str,
        num_classes: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        alpha: float = 0.8,
        checkpoint_layers: bool = False,
    ):
        if size not in TABLES:
            raise ValueError(f"unknown Pixel-Mamba size '{size}'; choose one of {', '.join(TABLES)}")
        super().__init__(TABLES[size], d_state, d_conv, expand, alpha, checkpoint_layers)
        self.size = size
        self.head = PoolingHead(output_shape(self.table[-1])[1], num_classes)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters timm's optimizer factory keeps out of weight decay: those the mixer
        marks `_no_weight_decay` (mamba_ssm's convention: the SSM's A_log and D)."""
        return no_weight_decay_names(self)

    def regions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, n, R, R, 3): the image's R x R regions in zigzag order over the grid."""
        b, channels, height, width = images.shape
        r = self.region_size
        if channels != 3 or height % r or width % r:
            raise ValueError(f"Pixel-Mamba takes RGB images whose sides are multiples of {r} px, got {tuple(images.shape[1:])}")
        rows, cols = height // r, width // r
        grid = images.permute(0, 2, 3, 1).reshape(b, rows, r, cols, r, 3).transpose(2, 3).reshape(b, rows * cols, r, r, 3)
        cells = np.stack(np.divmod(np.arange(rows * cols), cols), axis=1)
        order = torch.from_numpy(zigzag_region_order(cells)).to(images.device)
        return grid[:, order]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.features(images))


def pixel_mamba_classifier(model: str, num_classes: int, **kwargs) -> PixelMambaClassifier:
    """`model` is a pretraining model name: pixel_mamba_6m | pixel_mamba_21m."""
    if model not in MODEL_SIZES:
        raise ValueError(f"unknown pretraining model '{model}'; choose one of {', '.join(MODEL_SIZES)}")
    return PixelMambaClassifier(MODEL_SIZES[model], num_classes, **kwargs)

