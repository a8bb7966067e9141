"""Pixel-Mamba's parameter-free token operations on the region tensor: one bag `[n_regions, h, w, C]`
(a slide) or a batch of bags `[B, n_regions, h, w, C]` (ImageNet images, the same n in each).

- cutting a slide's 2.5x tissue image into its tissue regions, in region-based zigzag scan order;
- serialising the region tensor into the mixer's flat sequence (and back);
- token expansion (TE) and region fusion (RF).

Hand-written: no library has these operations (they are the paper's own; shared PIXEL_MAMBA.md 4-6).
The region dimension is kept in scan order from input to output: RF merges only scan-order neighbours
and a merged group keeps its place, so the sequence the mixer sees stays a zigzag scan.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from methods.pixel_mamba.layers import TokenExpansion


def zigzag_region_order(regions: np.ndarray) -> np.ndarray:
    """Indices that put regions (rows of (row, col) on the region grid) in boustrophedon order:
    grid row 0 left to right, row 1 right to left, and so on. Absent (background) regions are skipped."""
    regions = np.asarray(regions, dtype=np.int64).reshape(-1, 2)
    rows, cols = regions[:, 0], regions[:, 1]
    cols_in_scan_direction = np.where(rows % 2 == 0, cols, -cols)
    return np.lexsort((cols_in_scan_direction, rows))


def cut_regions(image: np.ndarray, regions: np.ndarray, region_size: int) -> np.ndarray:
    """The pixels of each region, `(n, R, R, 3)`, in the order of `regions` ((row, col) grid cells).

    image: (H, W, 3) with H and W multiples of R (the slide stage pads them); a memmap is fine."""
    height, width = image.shape[:2]
    if height % region_size or width % region_size:
        raise ValueError(f"image {width}x{height} is not a whole number of {region_size}-pixel regions")
    grid = image.reshape(height // region_size, region_size, width // region_size, region_size, -1)
    regions = np.asarray(regions, dtype=np.int64).reshape(-1, 2)
    return np.ascontiguousarray(grid.transpose(0, 2, 1, 3, 4)[regions[:, 0], regions[:, 1]])


def _zigzag_permutation(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Positions of the h x w tokens of a region in zigzag order (odd rows right to left).
    It reverses within rows only, so it is its own inverse."""
    index = torch.arange(h * w, device=device).view(h, w)
    index[1::2] = index[1::2].flip(1)
    return index.flatten()


def serialize(x: torch.Tensor) -> torch.Tensor:
    """`[n, h, w, C]` -> `(1, n*h*w, C)`, `[B, n, h, w, C]` -> `(B, n*h*w, C)`: one sequence per bag,
    regions in their (scan) order, tokens zigzag inside each."""
    n, h, w, c = x.shape[-4:]
    flat = x.reshape(-1, h * w, c)
    if h > 1 and w > 1:
        flat = flat[:, _zigzag_permutation(h, w, x.device)]
    return flat.reshape(-1, n * h * w, c)


def deserialize(seq: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `serialize`: `(B, n*h*w, C)` -> the region tensor of the given shape."""
    h, w, c = shape[-3:]
    flat = seq.reshape(-1, h * w, c)
    if h > 1 and w > 1:
        flat = flat[:, _zigzag_permutation(h, w, seq.device)]
    return flat.reshape(shape)


def token_expansion(x: torch.Tensor, te: TokenExpansion) -> torch.Tensor:
    """Merge pairs of neighbouring tokens of each region.

    h: tokens (i, 2j) and (i, 2j+1) -> [..., h, w/2, .]; v: (2i, j) and (2i+1, j) -> [..., h/2, w, .].
    cat: channels of the first token, then of the second (C -> 2C); avg: their mean (C -> C)."""
    *regions, h, w, c = x.shape
    if te.direction == "h":
        if w % 2:
            raise ValueError(f"horizontal token expansion needs an even token grid width, got {w}")
        pairs = x.reshape(*regions, h, w // 2, 2, c)
    else:
        if h % 2:
            raise ValueError(f"vertical token expansion needs an even token grid height, got {h}")
        pairs = x.reshape(*regions, h // 2, 2, w, c).transpose(-3, -2)
    if te.mode == "cat":
        return pairs.reshape(*pairs.shape[:-2], 2 * c)
    return pairs.mean(dim=-2)


def fusion_schedule(n_input_regions: int, alpha: float, n_layers: int) -> list[int]:
    """Regions merged away at each layer: k = ceil(alpha * n / L), until round(alpha * n) are gone.

    The budget keeps the design's "alpha of the regions are fused by the end": without it the rounding
    up of k fuses far more when n is small (n = 10: k = 1 for 24 layers would fuse everything by
    layer 10 instead of 8 of the 10 regions); for n >> L it only trims the last layers' k."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"region fusion alpha must lie in [0, 1], got {alpha}")
    k = math.ceil(alpha * n_input_regions / n_layers)
    remaining = min(round(alpha * n_input_regions), n_input_regions - 1)
    schedule = []
    for _ in range(n_layers):
        schedule.append(max(0, min(k, remaining)))
        remaining -= schedule[-1]
    return schedule


def region_fusion(x: torch.Tensor, sizes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge away exactly min(k, n-1) regions of each bag, each into a scan-order neighbour.

    The k most similar neighbouring pairs (cosine similarity of mean token features, one value per pair
    of successive regions: linear in n, no n x n matrix) are joined; joined runs of successive regions
    become one region whose tokens are the size-weighted average of its members' tokens and whose size
    is their sum. Groups keep their place in scan order. Every bag of a batch loses k regions, so the
    batch stays a tensor.
    x: [n, h, w, C] or [B, n, h, w, C]; sizes: x.shape[:-3] float, the number of input regions each
    region stands for."""
    n, h, w, c = x.shape[-4:]
    k = min(k, n - 1)
    if k <= 0:
        return x, sizes
    bags = x.reshape(-1, n, h, w, c)
    b, kept = bags.shape[0], n - k
    with torch.no_grad():  # the choice of pairs is discrete: no gradient flows through it
        means = bags.detach().float().mean(dim=(2, 3))
        similarity = F.cosine_similarity(means[:, :-1], means[:, 1:], dim=2)
        joined = torch.topk(similarity, k, dim=1, sorted=False).indices  # pair (i, i+1): i+1 joins i's group
        starts_group = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, joined + 1, False)
        # Each bag has `kept` groups, so numbering the groups through the whole batch gives bag i's groups
        # the rows i*kept .. (i+1)*kept - 1 of the flat output: one index_add_ merges every bag.
        group = torch.cumsum(starts_group.flatten().long(), 0) - 1
    flat_sizes = sizes.reshape(-1)
    new_sizes = torch.zeros(b * kept, dtype=sizes.dtype, device=sizes.device).index_add_(0, group, flat_sizes)
    weight = (flat_sizes / new_sizes[group]).to(x.dtype).view(-1, 1, 1, 1)
    merged = torch.zeros((b * kept, h, w, c), dtype=x.dtype, device=x.device)
    merged.index_add_(0, group, bags.flatten(0, 1) * weight)
    return merged.view(*x.shape[:-4], kept, h, w, c), new_sizes.view(*x.shape[:-4], kept)
