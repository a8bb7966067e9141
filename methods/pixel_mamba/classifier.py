"""Pixel-Mamba as an ImageNet classifier: the pretraining model of the paper (shared PIXEL_MAMBA.md
section 8). Its body is the WSI model's body, layer for layer and with the same parameter names
(`layers.{i}.norm.*`, `layers.{i}.mixer.*`), so a pretraining checkpoint loads into `pixel_mamba`
fine-tuning with `--weights PATH` and only the head is new.

An image is a small slide: a 224 x 224 image is a 7 x 7 grid of 32 x 32 regions, taken in the same
region-based zigzag order, fused and expanded by the same token operations. Images are batched (the
WSI model takes one bag at a time); every image of a batch has the same number of regions, so region
fusion merges the same number of regions in each and the batch stays a tensor.

    model = pixel_mamba_classifier("pixel_mamba_6m", num_classes=1000)
    logits = model(images)   # images: (B, 3, H, W) normalised with the ImageNet mean/std (timm's
                             # transforms), H and W multiples of 32; logits: (B, num_classes)

Input scale matches the WSI model: it normalises RGB 0..255 by 255 x the same ImageNet mean/std.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.pixel_mamba.layers import TABLES, output_shape
from methods.pixel_mamba.model import NORM_EPS, Block
from methods.pixel_mamba.token_ops import deserialize, fusion_schedule, serialize, token_expansion, zigzag_region_order
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


class PixelMambaClassifier(nn.Module):
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
        super().__init__()
        if size not in TABLES:
            raise ValueError(f"unknown Pixel-Mamba size '{size}'; choose one of {', '.join(TABLES)}")
        self.size = size
        self.table = TABLES[size]
        self.alpha = alpha
        self.checkpoint_layers = checkpoint_layers
        self.region_size = output_shape(self.table[-1])[0][0]
        self.layers = nn.ModuleList(Block(spec.channels, d_state, d_conv, expand) for spec in self.table)
        self.head = PoolingHead(output_shape(self.table[-1])[1], num_classes)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters timm's optimizer factory keeps out of weight decay: those the mixer
        marks `_no_weight_decay` (mamba_ssm's convention: the SSM's A_log and D)."""
        return no_weight_decay_names(self)

    def image_regions(self, images: torch.Tensor) -> torch.Tensor:
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

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final region tokens (B, n', C_last) and their sizes (B, n') for normalised images."""
        x = self.image_regions(images)
        b, n = x.shape[:2]
        sizes = torch.ones(b, n, device=x.device)
        schedule = fusion_schedule(n, self.alpha, len(self.layers))  # the WSI model's schedule
        for spec, block, k in zip(self.table, self.layers, schedule):
            seq = serialize_batch(x)
            if self.checkpoint_layers and torch.is_grad_enabled():
                seq = checkpoint(block, seq, use_reentrant=False)
            else:
                seq = block(seq)
            x, sizes = region_fusion_batch(deserialize_batch(seq, x.shape), sizes, k)
            if spec.te is not None:
                b, n, h, w, c = x.shape
                x = token_expansion(x.reshape(b * n, h, w, c), spec.te)
                x = x.reshape(b, n, *x.shape[1:])
        return x.reshape(x.shape[0], x.shape[1], -1), sizes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(*self.features(images))


def pixel_mamba_classifier(model: str, num_classes: int, **kwargs) -> PixelMambaClassifier:
    """`model` is a pretraining model name: pixel_mamba_6m | pixel_mamba_21m."""
    if model not in MODEL_SIZES:
        raise ValueError(f"unknown pretraining model '{model}'; choose one of {', '.join(MODEL_SIZES)}")
    return PixelMambaClassifier(MODEL_SIZES[model], num_classes, **kwargs)


# ---- the WSI token operations over a batch of images ------------------------------------------------
# `serialize`/`deserialize` act on the regions of one bag; regions of successive images are successive
# in memory, so a batch is its images' bags side by side.
def serialize_batch(x: torch.Tensor) -> torch.Tensor:
    """`[B, n, h, w, C]` -> `(B, n*h*w, C)`: one zigzag sequence per image."""
    b, n, h, w, c = x.shape
    return serialize(x.reshape(b * n, h, w, c)).reshape(b, n * h * w, c)


def deserialize_batch(seq: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    b, n, h, w, c = shape
    return deserialize(seq.reshape(1, b * n * h * w, c), (b * n, h, w, c)).reshape(b, n, h, w, c)


def region_fusion_batch(x: torch.Tensor, sizes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_ops.region_fusion` for each image of a batch at once: in every image, merge away exactly
    min(k, n-1) regions into scan-order neighbours (the k most similar successive pairs by cosine
    similarity of mean token features), size-weighted. Hand-written because the WSI op takes one bag;
    tests check it against that op image by image.
    x: [B, n, h, w, C]; sizes: (B, n) float."""
    b, n = x.shape[:2]
    k = min(k, n - 1)
    if k <= 0:
        return x, sizes
    kept = n - k
    with torch.no_grad():  # the choice of pairs is discrete: no gradient flows through it
        means = x.detach().float().mean(dim=(2, 3))
        similarity = F.cosine_similarity(means[:, :-1], means[:, 1:], dim=-1)
        joined = torch.topk(similarity, k, dim=1, sorted=False).indices  # pair (i, i+1): i+1 joins i
        starts_group = torch.ones(b, n, dtype=torch.bool, device=x.device)
        starts_group.scatter_(1, joined + 1, False)
        group = torch.cumsum(starts_group.long(), dim=1) - 1  # (B, n) in [0, kept)
        flat_group = (group + torch.arange(b, device=x.device).view(b, 1) * kept).flatten()
    new_sizes = torch.zeros(b * kept, dtype=sizes.dtype, device=sizes.device).index_add_(0, flat_group, sizes.flatten())
    new_sizes = new_sizes.view(b, kept)
    weight = (sizes / new_sizes.gather(1, group)).to(x.dtype).view(b, n, 1, 1, 1)
    merged = torch.zeros((b * kept, *x.shape[2:]), dtype=x.dtype, device=x.device)
    merged.index_add_(0, flat_group, (x * weight).flatten(0, 1))
    return merged.view(b, kept, *x.shape[2:]), new_sizes
