"""Patch grids at a physical magnification, written and read in CLAM's and TRIDENT's h5 layouts.

The grid follows CLAM: per tissue contour, a grid anchored at the contour's bounding box; a patch is
kept when any of the 4 points at +-patch/4 around its centre lies in the contour (boundary included)
and its centre is not strictly inside one of the contour's holes. Patch size and step are given at
the target magnification and converted to level-0 pixels with the slide's MPP, so 20x and 40x slides
give the same physical patches. Coordinates are level-0 top-left corners, sorted row-major.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

from datasets.cache import atomic_path
from datasets.slides import WSI, SlideError, magnification_to_mpp
from datasets.tissue import Tissue

PRODUCER = "wsi-bench"


@dataclass(frozen=True)
class PatchParams:
    """Patches of `patch_size` pixels at `magnification` (20x = 0.5 um/px), every `step` pixels at that
    magnification (default: patch_size, no overlap). 512 px at 20x is what TRIDENT recommends for CONCH."""

    magnification: float = 20
    patch_size: int = 256
    step: int | None = None

    def __post_init__(self):
        if self.magnification <= 0 or self.patch_size <= 0 or (self.step is not None and self.step <= 0):
            raise ValueError(f"magnification, patch_size and step must be positive, got {self}")

    @property
    def target_mpp(self) -> float:
        return magnification_to_mpp(self.magnification)

    @property
    def step_size(self) -> int:
        return self.patch_size if self.step is None else self.step


def level0_size(size: int, target_mpp: float, level0_mpp: float) -> int:
    """`size` pixels at `target_mpp` in level-0 pixels (256 px at 20x = 512 level-0 px of a 40x slide)."""
    return max(1, round(size * target_mpp / level0_mpp))


def patch_grid(tissue: Tissue, patch_size_level0: int, step_level0: int) -> np.ndarray:
    """(N, 2) int64 level-0 top-left corners of the kept patches, unique, sorted by (y, x)."""
    found = []
    shift = patch_size_level0 // 2 // 2  # CLAM: int(patch_size // 2 * center_shift), center_shift 0.5
    offsets = [(-shift, -shift), (shift, shift), (shift, -shift), (-shift, shift)] if shift else [(0, 0)]
    half = patch_size_level0 // 2
    for contour, holes in zip(tissue.contours, tissue.holes):
        x0, y0, width, height = cv2.boundingRect(contour)
        for y in range(y0, y0 + height, step_level0):
            for x in range(x0, x0 + width, step_level0):
                cx, cy = x + half, y + half
                # OpenCV's point-in-polygon test is exact on the integer contours and is what CLAM
                # uses; a hand-written vectorised test would have to reproduce its boundary rules
                if not any(cv2.pointPolygonTest(contour, (float(cx + dx), float(cy + dy)), False) >= 0
                           for dx, dy in offsets):
                    continue
                centre = (x + patch_size_level0 / 2, y + patch_size_level0 / 2)
                if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in holes):
                    continue
                found.append((x, y))
    if not found:
        return np.zeros((0, 2), np.int64)
    coords = np.unique(np.array(found, np.int64), axis=0)
    return coords[np.lexsort((coords[:, 0], coords[:, 1]))]


def _patch_level(wsi: WSI, downsample: float) -> int:
    """The level CLAM readers should read from: one whose downsample equals the patch downsample if the
    slide has one (then CLAM's `patch_size` at `patch_level` is exactly our patch), else the best finer one."""
    for level, d in enumerate(wsi.level_downsamples):
        if abs(d - downsample) <= 0.01 * downsample:
            return level
    return wsi.best_level(downsample)


def grid_for_slide(wsi: WSI, tissue: Tissue, params: PatchParams) -> tuple[np.ndarray, dict]:
    """The patch grid of one slide and the attributes CLAM, TRIDENT and we write with it."""
    size0 = level0_size(params.patch_size, params.target_mpp, wsi.mpp)
    step0 = level0_size(params.step_size, params.target_mpp, wsi.mpp)
    coords = patch_grid(tissue, size0, step0)
    if len(coords) == 0:
        raise SlideError(f"no patch of {params.patch_size} px at {params.magnification:g}x has tissue at its "
                         "centre; use smaller patches or check the tissue mask", stage="patches", slide=wsi.slide_id)
    level = _patch_level(wsi, params.target_mpp / wsi.mpp)
    level_downsample = wsi.level_downsamples[level]
    width, height = wsi.dimensions
    attrs = {
        # shared by CLAM and TRIDENT: the patch size at the target magnification
        "patch_size": params.patch_size,
        "name": wsi.slide_id,
        # CLAM
        "patch_level": level,
        "downsample": np.array([level_downsample, level_downsample], np.float64),
        "downsampled_level_dim": np.array(wsi.level_dimensions[level], np.int64),
        "level_dim": np.array(wsi.dimensions, np.int64),
        # TRIDENT
        "patch_size_level0": size0,
        "level0_magnification": wsi.magnification,
        "target_magnification": float(params.magnification),
        "overlap": params.patch_size - params.step_size,
        "level0_width": width,
        "level0_height": height,
        # ours
        "level0_mpp": wsi.mpp,
        "target_mpp": params.target_mpp,
        "step_level0": step0,
        "producer": PRODUCER,
        "params": json.dumps(asdict(params), sort_keys=True),
        "tissue_params": json.dumps(tissue.params, sort_keys=True),
    }
    return coords, attrs


def write_coords(path, coords: np.ndarray, attrs: dict) -> Path:
    """Coordinates h5 as CLAM and TRIDENT write it: dataset `coords` (N, 2) with the attributes on it."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        dataset = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for key, value in attrs.items():
            dataset.attrs[key] = value
    return path


def _optional_float(value) -> float | None:
    return None if value is None else float(np.asarray(value).reshape(-1)[0])


def read_coords(path) -> tuple[np.ndarray, dict]:
    """(N, 2) int64 level-0 top-left coordinates and normalised attributes of our, CLAM's or TRIDENT's file.

    Attributes: patch_size (at the target magnification), patch_size_level0, target_magnification,
    level0_magnification, level0_mpp (None where the file does not say), format ('wsi-bench', 'trident'
    or 'clam'), and patch_level, level0_width, level0_height where known.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"coordinates file not found: {path}")
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{path} has no 'coords' dataset; expected a CLAM or TRIDENT patch file")
        coords = np.asarray(f["coords"][:]).astype(np.int64).reshape(-1, 2)
        raw = {**dict(f.attrs), **dict(f["coords"].attrs)}  # attributes live on the dataset; root as fallback
    if "patch_size" not in raw:
        raise ValueError(f"{path}: 'coords' has no patch_size attribute; not a CLAM or TRIDENT patch file")
    patch_size = int(_optional_float(raw["patch_size"]))
    attrs = {"patch_size": patch_size, "level0_mpp": _optional_float(raw.get("level0_mpp")),
             "target_magnification": _optional_float(raw.get("target_magnification")),
             "level0_magnification": _optional_float(raw.get("level0_magnification"))}
    if "patch_size_level0" in raw:  # TRIDENT's frame (ours too): patch_size is at the target magnification
        attrs["patch_size_level0"] = int(_optional_float(raw["patch_size_level0"]))
        attrs["format"] = PRODUCER if raw.get("producer") == PRODUCER else "trident"
    elif "patch_level" in raw:  # CLAM: patch_size is at patch_level, whose downsample is stored
        downsample = _optional_float(raw.get("downsample", 1.0))
        attrs["patch_size_level0"] = round(patch_size * downsample)
        attrs["format"] = "clam"
    else:
        raise ValueError(f"{path}: 'coords' has neither patch_size_level0 (TRIDENT) nor patch_level (CLAM); "
                         "cannot tell the coordinate frame")
    if "patch_level" in raw:
        attrs["patch_level"] = int(_optional_float(raw["patch_level"]))
    if "level0_width" in raw:
        attrs["level0_width"], attrs["level0_height"] = int(raw["level0_width"]), int(raw["level0_height"])
    elif "level_dim" in raw:
        attrs["level0_width"], attrs["level0_height"] = (int(v) for v in raw["level_dim"])
    return coords, attrs
