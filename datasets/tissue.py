"""Tissue segmentation as CLAM does it, plus a quality-control thumbnail.

Saturation of a median-blurred HSV image at a low level (the level closest to downsample 64),
thresholded (8, or Otsu), closed, then contours: tissue contours whose area minus holes exceeds a_t and
holes larger than a_h (at most 8 per contour), areas in units of a 512 x 512 level-0 patch.
Contours are kept in level-0 pixel coordinates; the patch grid and the 2.5x mask are made from them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

from datasets.cache import atomic_path
from datasets.slides import WSI, SlideError


@dataclass(frozen=True)
class TissueParams:
    """CLAM's segmentation parameters (`seg_params` and `filter_params` of its presets)."""

    seg_downsample: float = 64.0  # segment at the pyramid level closest to this downsample
    sthresh: int = 8  # saturation threshold (0-255); ignored with use_otsu
    use_otsu: bool = False
    median_kernel: int = 7  # CLAM's mthresh: median blur kernel of the saturation channel (odd)
    close: int = 4  # morphological closing kernel (pixels at the segmentation level); 0 = none
    a_t: float = 100.0  # minimum tissue area (area minus holes), in 512 x 512 level-0 patches
    a_h: float = 16.0  # minimum hole area, same unit
    max_n_holes: int = 8
    ref_patch_size: int = 512

    def __post_init__(self):
        if self.median_kernel < 1 or self.median_kernel % 2 == 0:
            raise ValueError(f"median_kernel must be a positive odd number, got {self.median_kernel}")
        if self.seg_downsample < 1:
            raise ValueError(f"seg_downsample must be >= 1, got {self.seg_downsample}")


TISSUE_PRESETS = {
    "default": TissueParams(),
    "tcga": TissueParams(a_t=16.0, a_h=4.0),  # CLAM's tcga.csv preset: smaller pieces kept
    # the synthetic slides are about 1 x 0.8 mm: CLAM's a_t = 100 (1.6 mm^2) would reject every piece
    "synthetic": TissueParams(a_t=1.0, a_h=1.0),
}


@dataclass
class Tissue:
    """Tissue contours of one slide in level-0 pixel coordinates (x, y).

    contours: one (K, 2) int32 array per tissue piece; holes: for each contour, its kept holes.
    """

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    dimensions: tuple[int, int]  # level-0 (W, H)
    seg_level: int  # pyramid level segmented; -1 when the slide had none near the target and was resampled
    seg_scale: tuple[float, float]  # level-0 pixels per segmentation pixel (x, y)
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def area(self) -> float:
        """Tissue area in level-0 pixels (contours minus holes)."""
        return float(sum(cv2.contourArea(c) - sum(cv2.contourArea(h) for h in hs)
                         for c, hs in zip(self.contours, self.holes)))

    def mask(self, width: int, height: int) -> np.ndarray:
        """(height, width) bool tissue mask of the whole slide rasterised at that size."""
        scale = np.array([width / self.dimensions[0], height / self.dimensions[1]])
        shift = 4  # sub-pixel precision of cv2.fillPoly: coordinates in 1/16 pixel
        def fixed(points):
            return [np.round(p.astype(np.float64) * scale * (1 << shift)).astype(np.int32) for p in points]
        mask = np.zeros((height, width), np.uint8)
        if self.contours:
            cv2.fillPoly(mask, fixed(self.contours), 1, shift=shift)
        holes = [h for hs in self.holes for h in hs]
        if holes:
            cv2.fillPoly(mask, fixed(holes), 0, shift=shift)
        return mask.astype(bool)

    def save(self, path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            _write_polygons(f, "contours", self.contours)
            _write_polygons(f, "holes", [h for hs in self.holes for h in hs])
            f["hole_parent"] = np.array([i for i, hs in enumerate(self.holes) for _ in hs], np.int64)
            f.attrs["level0_width"], f.attrs["level0_height"] = self.dimensions
            f.attrs["seg_level"] = self.seg_level
            f.attrs["seg_scale"] = self.seg_scale
            f.attrs["params"] = json.dumps(self.params, sort_keys=True)
        return path

    @classmethod
    def load(cls, path) -> "Tissue":
        with h5py.File(path, "r") as f:
            contours = _read_polygons(f, "contours")
            holes: list[list[np.ndarray]] = [[] for _ in contours]
            for parent, hole in zip(f["hole_parent"][:], _read_polygons(f, "holes")):
                holes[int(parent)].append(hole)
            return cls(contours, holes, (int(f.attrs["level0_width"]), int(f.attrs["level0_height"])),
                       int(f.attrs["seg_level"]), tuple(float(s) for s in f.attrs["seg_scale"]),
                       json.loads(f.attrs["params"]))


def _write_polygons(f: h5py.File, name: str, polygons: list[np.ndarray]) -> None:
    points = np.concatenate(polygons) if polygons else np.zeros((0, 2), np.int32)
    f[name] = points.reshape(-1, 2).astype(np.int32)
    f[f"{name}_offsets"] = np.cumsum([0] + [len(p) for p in polygons]).astype(np.int64)


def _read_polygons(f: h5py.File, name: str) -> list[np.ndarray]:
    points, offsets = f[name][:], f[f"{name}_offsets"][:]
    return [points[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def segmentation_image(wsi: WSI, target_downsample: float) -> tuple[np.ndarray, int, tuple[float, float]]:
    """The image CLAM segments: the level closest to `target_downsample` (in log scale).

    When no level is within a factor of 4 (a flat TIFF, or a pyramid that stops early), the slide is
    resampled to the target downsample instead, so memory stays bounded on big slides.
    Returns (RGB image, level or -1 when resampled, level-0 pixels per image pixel (x, y)).
    """
    distance = [abs(math.log2(d / target_downsample)) for d in wsi.level_downsamples]
    level = int(np.argmin(distance))
    if distance[level] <= 2:
        image = wsi.read_level(level)
    else:
        level = -1
        image = wsi.read_full(wsi.mpp * target_downsample)
    height, width = image.shape[:2]
    return image, level, (wsi.dimensions[0] / width, wsi.dimensions[1] / height)


def tissue_binary(image_rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """uint8 0/255 mask: saturation of the median-blurred HSV image above threshold, then closing."""
    saturation = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    blurred = cv2.medianBlur(saturation, params.median_kernel)
    if params.use_otsu:
        _, binary = cv2.threshold(blurred, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(blurred, params.sthresh, 255, cv2.THRESH_BINARY)
    if params.close > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((params.close, params.close), np.uint8))
    return binary


def filter_contours(binary: np.ndarray, scale: tuple[float, float], params: TissueParams
                    ) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """CLAM's contour filter on a binary mask; contours are returned in the mask's pixel coordinates."""
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return [], []
    parent = hierarchy[0][:, 3]
    # CLAM scales the area filters to the segmentation level, truncating as it does
    ref_area = int(params.ref_patch_size ** 2 / (scale[0] * scale[1]))
    min_tissue, min_hole = params.a_t * ref_area, params.a_h * ref_area
    kept, kept_holes = [], []
    for index in np.flatnonzero(parent == -1):
        hole_ids = np.flatnonzero(parent == index)
        area = cv2.contourArea(contours[index]) - sum(cv2.contourArea(contours[h]) for h in hole_ids)
        if area == 0 or area <= min_tissue:
            continue
        holes = sorted((contours[h] for h in hole_ids), key=cv2.contourArea, reverse=True)[: params.max_n_holes]
        kept.append(contours[index].reshape(-1, 2))
        kept_holes.append([h.reshape(-1, 2) for h in holes if cv2.contourArea(h) > min_hole])
    return kept, kept_holes


def segment_tissue(wsi: WSI, params: TissueParams = TissueParams()) -> tuple[Tissue, np.ndarray]:
    """Segment `wsi`; returns the tissue (level-0 contours) and the image it was segmented on.

    Raises SlideError (stage 'tissue') when no tissue piece passes the filters.
    """
    image, level, scale = segmentation_image(wsi, params.seg_downsample)
    binary = tissue_binary(image, params)
    contours, holes = filter_contours(binary, scale, params)
    if not contours:
        threshold = "Otsu's threshold" if params.use_otsu else f"saturation > {params.sthresh}"
        found = ("only pieces smaller than a_t" if binary.any() else f"no pixel with {threshold}")
        raise SlideError(f"no tissue found ({found}, a_t={params.a_t:g} patches of {params.ref_patch_size} level-0 px); "
                         "check the slide, or lower TissueParams.a_t / sthresh", stage="tissue", slide=wsi.slide_id)
    to_level0 = np.array(scale)
    # CLAM scales contour vertices by the level downsample and truncates to int32
    tissue = Tissue(
        contours=[(c * to_level0).astype(np.int32) for c in contours],
        holes=[[(h * to_level0).astype(np.int32) for h in hs] for hs in holes],
        dimensions=tuple(wsi.dimensions),
        seg_level=level,
        seg_scale=(float(scale[0]), float(scale[1])),
        params=dataclasses.asdict(params),
    )
    return tissue, image


def write_thumbnail(image_rgb: np.ndarray, tissue: Tissue, path, max_size: int = 1024) -> Path:
    """PNG of the slide with tissue outlines (green) and holes (blue), for quality control."""
    factor = min(1.0, max_size / max(image_rgb.shape[:2]))
    height, width = round(image_rgb.shape[0] * factor), round(image_rgb.shape[1] * factor)
    thumb = cv2.resize(image_rgb, (width, height), interpolation=cv2.INTER_AREA)
    scale = np.array([width / tissue.dimensions[0], height / tissue.dimensions[1]])
    def scaled(polygons):
        return [np.round(p * scale).astype(np.int32) for p in polygons]
    thickness = max(1, round(max(width, height) / 500))
    cv2.polylines(thumb, scaled(tissue.contours), True, (0, 200, 0), thickness)
    cv2.polylines(thumb, scaled([h for hs in tissue.holes for h in hs]), True, (0, 0, 255), thickness)
    path = Path(path)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)):
            raise RuntimeError(f"could not write the thumbnail {path}; check the cache folder is writable")
    return path
