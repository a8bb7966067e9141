"""2.5x tissue images for end-to-end models, and random tissue regions at any magnification.

A tissue image is the whole slide at `mpp` (4 um/px = 2.5x), its tissue mask at the same scale, and
the grid of R x R regions (R = 32) with their tissue fractions. It is stored as a folder of .npy files
opened with mmap_mode='r', so a training epoch maps them instead of decoding the slide again.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.cache import atomic_path
from datasets.slides import WSI, SlideError
from datasets.tissue import Tissue

ARRAYS = ("image", "mask", "regions", "tissue_fraction")


@dataclass(frozen=True)
class LowresParams:
    mpp: float = 4.0  # um/px of the tissue image (4 = 2.5x)
    region_size: int = 32  # R: side of a region, in pixels of the tissue image
    min_tissue: float = 0.25  # regions with a smaller tissue fraction are left out of `regions`

    def __post_init__(self):
        if self.mpp <= 0 or self.region_size <= 0 or not 0 <= self.min_tissue <= 1:
            raise ValueError(f"need mpp > 0, region_size > 0 and 0 <= min_tissue <= 1, got {self}")


class TissueImage:
    """A slide's tissue image as end-to-end models read it (arrays memory-mapped from the cache).

    image: (H, W, 3) uint8 at `mpp`, H and W multiples of region_size, padded white.
    mask: (H, W) bool tissue mask at the same scale.
    regions: (n, 2) int (row, col) on the region grid, row-major, regions with tissue >= min_tissue.
    tissue_fraction: (n,) float tissue fraction of those regions.
    """

    def __init__(self, image, mask, regions, tissue_fraction, meta: dict):
        self.image = image
        self.mask = mask
        self.regions = regions
        self.tissue_fraction = tissue_fraction
        self.meta = meta
        self.mpp: float = meta["mpp"]
        self.region_size: int = meta["region_size"]
        self.slide_id: str = meta["slide_id"]

    @property
    def level0_scale(self) -> float:
        """Level-0 pixels per tissue-image pixel."""
        return self.mpp / self.meta["level0_mpp"]

    def region(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and mask of region `index` of `regions`."""
        row, col = self.regions[index]
        r = self.region_size
        window = np.s_[row * r : (row + 1) * r, col * r : (col + 1) * r]
        return self.image[window], self.mask[window]

    @classmethod
    def load(cls, path) -> "TissueImage":
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"no tissue image at {path}; run preprocess_slides with products=('lowres',)")
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        return cls(**arrays, meta=json.loads((path / "meta.json").read_text()))


def build_tissue_image(wsi: WSI, tissue: Tissue, params: LowresParams) -> TissueImage:
    """Read the slide at params.mpp, rasterise its tissue contours there, and grade the region grid."""
    width, height = wsi.size_at(params.mpp)
    r = params.region_size
    padded_w, padded_h = math.ceil(width / r) * r, math.ceil(height / r) * r
    image = np.full((padded_h, padded_w, 3), 255, np.uint8)
    image[:height, :width] = wsi.read_rect(0, 0, width, height, params.mpp)
    mask = np.zeros((padded_h, padded_w), bool)
    mask[:height, :width] = tissue.mask(width, height)
    fraction = mask.reshape(padded_h // r, r, padded_w // r, r).mean(axis=(1, 3))
    regions = np.argwhere(fraction >= params.min_tissue)  # row-major
    if len(regions) == 0:
        raise SlideError(f"no {r} x {r} region at {params.mpp:g} um/px has {params.min_tissue:.0%} tissue; "
                         "lower min_tissue or check the tissue mask", stage="lowres", slide=wsi.slide_id)
    meta = {**asdict(params), "slide_id": wsi.slide_id, "level0_mpp": wsi.mpp,
            "level0_width": wsi.dimensions[0], "level0_height": wsi.dimensions[1],
            "width": width, "height": height}
    return TissueImage(image, mask, regions.astype(np.int64),
                       fraction[regions[:, 0], regions[:, 1]].astype(np.float32), meta)


def write_tissue_image(tissue_image: TissueImage, path) -> Path:
    """Store as a folder of .npy files plus meta.json; the folder appears complete or not at all."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(tissue_image, name)))
        (tmp / "meta.json").write_text(json.dumps(tissue_image.meta, sort_keys=True, indent=1))
    return path


@dataclass(frozen=True)
class TissueMask:
    """A slide's tissue mask ready for sampling: the mask, level-0 px per mask column and per mask row,
    and the flat indices of its tissue pixels."""

    mask: np.ndarray
    scale_x: float
    scale_y: float
    pixels: np.ndarray


def tissue_mask(product, wsi: WSI) -> TissueMask:
    """The TissueMask of a TissueImage, a Tissue, or a path to either (build it once per slide when
    drawing regions several times)."""
    if isinstance(product, (str, Path)):
        product = TissueImage.load(product) if Path(product).is_dir() else Tissue.load(product)
    if isinstance(product, TissueImage):
        mask, scale_x, scale_y = product.mask, product.level0_scale, product.level0_scale
    elif isinstance(product, Tissue):
        width, height = wsi.size_at(LowresParams().mpp)
        mask, scale_x, scale_y = product.mask(width, height), wsi.dimensions[0] / width, wsi.dimensions[1] / height
    else:
        raise TypeError(f"expected a TissueImage, a Tissue or a path to one, got {type(product).__name__}")
    return TissueMask(mask, scale_x, scale_y, np.flatnonzero(mask))


def random_regions(wsi: WSI, tissue, n: int, size: int, mpp: float, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 regions of `size` px at `mpp`, centred on random tissue points.

    `tissue`: a TissueMask, or what `tissue_mask` takes. Centres are drawn uniformly over the tissue
    area (seeded), so the CAMELYON16 protocol is
    `random_regions(wsi, tissue_image, 100, 2048, MAGNIFICATION_MPP[20], seed)`. Regions may overlap.
    """
    if n <= 0 or size <= 0:
        raise ValueError(f"n and size must be positive, got n={n}, size={size}")
    sampler = tissue if isinstance(tissue, TissueMask) else tissue_mask(tissue, wsi)
    mask, scale_x, scale_y, tissue_pixels = sampler.mask, sampler.scale_x, sampler.scale_y, sampler.pixels
    if len(tissue_pixels) == 0:
        raise SlideError("its tissue mask is empty; nothing to sample", stage="regions", slide=wsi.slide_id)
    rng = np.random.default_rng(seed)
    picks = rng.choice(tissue_pixels, size=n, replace=True)
    rows, cols = np.divmod(picks, mask.shape[1])
    centre_x = (cols + rng.random(n)) * scale_x  # a uniform point inside the picked mask pixel
    centre_y = (rows + rng.random(n)) * scale_y
    half = size * mpp / wsi.mpp / 2
    return np.stack([wsi.read(round(x - half), round(y - half), size, mpp) for x, y in zip(centre_x, centre_y)])
