"""Pixel-Mamba's parameter-free token operations on the region tensor `[n_regions, h, w, C]`.

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
    """`[n, h, w, C]` -> `(1, n*h*w, C)`: regions in their (scan) order, tokens zigzag inside each."""
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    if h > 1 and w > 1:
        flat = flat[:, _zigzag_permutation(h, w, x.device)]
    return flat.reshape(1, n * h * w, c)


def deserialize(seq: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The inverse of `serialize`: `(1, n*h*w, C)` -> `[n, h, w, C]` of the given shape."""
    n, h, w, c = shape
    flat = seq.reshape(n, h * w, c)
    if h > 1 and w > 1:
        flat = flat[:, _zigzag_permutation(h, w, seq.device)]
    return flat.reshape(n, h, w, c)


def token_expansion(x: torch.Tensor, te: TokenExpansion) -> torch.Tensor:
    """Merge pairs of neighbouring tokens of each region.

    h: tokens (i, 2j) and (i, 2j+1) -> [n, h, w/2, .]; v: (2i, j) and (2i+1, j) -> [n, h/2, w, .].
    cat: channels of the first token, then of the second (C -> 2C); avg: their mean (C -> C)."""
    n, h, w, c = x.shape
    if te.direction == "h":
        if w % 2:
            raise ValueError(f"horizontal token expansion needs an even token grid width, got {w}")
        pairs = x.reshape(n, h, w // 2, 2, c)
    else:
        if h % 2:
            raise ValueError(f"vertical token expansion needs an even token grid height, got {h}")
        pairs = x.reshape(n, h // 2, 2, w, c).transpose(2, 3)
    if te.mode == "cat":
        return pairs.reshape(*pairs.shape[:3], 2 * c)
    return pairs.mean(dim=3)


def fusion_count(n_input_regions: int, alpha: float, n_layers: int) -> int:
    """k = ceil(alpha * n / L): regions merged away per layer (n = regions entering the model)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"region fusion alpha must lie in [0, 1], got {alpha}")
    return math.ceil(alpha * n_input_regions / n_layers)


def region_fusion(x: torch.Tensor, sizes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge away exactly min(k, n-1) regions, each into a scan-order neighbour.

    The k most similar neighbouring pairs (cosine similarity of mean token features, one value per pair
    of successive regions: linear in n, no n x n matrix) are joined; joined runs of successive regions
    become one region whose tokens are the size-weighted average of its members' tokens and whose size
    is their sum. Groups keep their place in scan order.
    x: [n, h, w, C]; sizes: (n,) float, the number of input regions each region stands for."""
    n = x.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return x, sizes
    with torch.no_grad():  # the choice of pairs is discrete: no gradient flows through it
        means = x.detach().float().mean(dim=(1, 2))
        similarity = F.cosine_similarity(means[:-1], means[1:], dim=1)
        joined = torch.topk(similarity, k, sorted=False).indices  # pair (i, i+1): i+1 joins i's group
        starts_group = torch.ones(n, dtype=torch.bool, device=x.device)
        starts_group[joined + 1] = False
        group = torch.cumsum(starts_group.long(), 0) - 1
    new_sizes = torch.zeros(n - k, dtype=sizes.dtype, device=sizes.device).index_add_(0, group, sizes)
    weight = (sizes / new_sizes[group]).to(x.dtype).view(n, 1, 1, 1)
    merged = torch.zeros((n - k, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return merged.index_add_(0, group, x * weight), new_sizes
