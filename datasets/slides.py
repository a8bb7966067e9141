"""Whole-slide image access through OpenSlide, at a physical resolution (um/px) rather than a level.

Every read names the resolution it wants; the slide is read from the best level at or finer than that
resolution and resized with cv2.INTER_AREA, so a 40x slide and a 20x slide of the same tissue give the
same physical patch.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import openslide

# Nominal magnification -> um/px, the convention of CLAM and TRIDENT (10x = 1 um/px).
MAGNIFICATION_MPP = {40: 0.25, 20: 0.5, 10: 1.0, 5: 2.0, 2.5: 4.0}
# Resolutions outside this range come from placeholder tags (72 dpi, 1 px/cm), not from a scanner.
PLAUSIBLE_MPP = (0.05, 50.0)
# Region reads are split into blocks of at most this many pixels a side, to bound memory on big slides.
READ_BLOCK = 4096


def magnification_to_mpp(magnification: float) -> float:
    return 10.0 / float(magnification)


def mpp_to_magnification(mpp: float) -> float:
    return 10.0 / float(mpp)


class SlideError(RuntimeError):
    """A slide that cannot be used: `stage` is where it failed, `reason` a one-line explanation."""

    def __init__(self, reason: str, *, stage: str = "open", slide: str = ""):
        self.reason = " ".join(str(reason).split())  # one line, whatever the underlying library said
        self.stage = stage
        self.slide = slide
        super().__init__(f"slide {slide} ({stage}): {self.reason}" if slide else self.reason)


def _float_property(properties, key: str) -> float | None:
    try:
        value = float(properties[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve_mpp(properties, default_mpp: float | None = None) -> tuple[float, str]:
    """Level-0 um/px and where it came from: openslide.mpp-x/y, else objective power, else default_mpp.

    Raises SlideError (stage 'open') when none of them gives a plausible value.
    """
    notes = []
    mpp_x, mpp_y = _float_property(properties, "openslide.mpp-x"), _float_property(properties, "openslide.mpp-y")
    if mpp_x or mpp_y:
        mpp = (mpp_x + mpp_y) / 2 if mpp_x and mpp_y else (mpp_x or mpp_y)
        if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            return mpp, "openslide.mpp"
        notes.append(f"implausible MPP {mpp:g} um/px in its metadata")
    power = _float_property(properties, "openslide.objective-power")
    if power:
        return magnification_to_mpp(power), "openslide.objective-power"
    if default_mpp is not None:
        if not PLAUSIBLE_MPP[0] <= default_mpp <= PLAUSIBLE_MPP[1]:
            raise ValueError(f"default_mpp={default_mpp} is not a plausible slide resolution; give um/px, e.g. 0.5 for 20x")
        return float(default_mpp), "default_mpp"
    found = notes[0] if notes else "no MPP (openslide.mpp-x/y)"
    raise SlideError(f"{found} and no objective power in the slide's metadata; pass default_mpp (--default-mpp) to set one")


class WSI:
    """An open slide with a known level-0 resolution. Use `WSI.open(path)`, and close it (or use `with`)."""

    def __init__(self, path: Path, slide: openslide.OpenSlide, mpp: float, mpp_source: str):
        self.path = path
        self.slide_id = path.stem
        self._slide = slide
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.dimensions: tuple[int, int] = slide.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = slide.level_dimensions
        self.level_downsamples: tuple[float, ...] = slide.level_downsamples
        self.properties = dict(slide.properties)

    @classmethod
    def open(cls, path, default_mpp: float | None = None) -> "WSI":
        path = Path(path).expanduser().absolute()
        if not path.is_file():
            raise SlideError(f"file not found: {path}; check the cohort's slide paths", slide=path.stem)
        try:
            slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as err:  # includes OpenSlideUnsupportedFormatError
            raise SlideError(f"OpenSlide cannot read it ({err}); check that the file is complete and a supported format",
                             slide=path.stem) from err
        try:
            mpp, source = resolve_mpp(slide.properties, default_mpp)
        except SlideError as err:
            slide.close()
            raise SlideError(err.reason, slide=path.stem) from None
        return cls(path, slide, mpp, source)

    @property
    def magnification(self) -> float:
        """Level-0 magnification implied by the MPP (0.5 um/px = 20x)."""
        return mpp_to_magnification(self.mpp)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at or below `downsample` (level 0 if none is)."""
        # tolerance: pyramids store downsamples such as 3.9998 for a nominal 4
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(W, H) of the whole slide at `mpp` um/px."""
        scale = self.mpp / mpp
        return max(1, round(self.dimensions[0] * scale)), max(1, round(self.dimensions[1] * scale))

    def read(self, x0: int, y0: int, size: int, mpp: float) -> np.ndarray:
        """(size, size, 3) uint8 RGB: the square whose top-left is (x0, y0) in level-0 pixels, at `mpp`."""
        return self.read_rect(x0, y0, size, size, mpp)

    def read_rect(self, x0: float, y0: float, width: int, height: int, mpp: float) -> np.ndarray:
        """(height, width, 3) uint8 RGB starting at level-0 (x0, y0), at `mpp` um/px; outside the slide is white."""
        if width <= 0 or height <= 0 or mpp <= 0:
            raise ValueError(f"read size and mpp must be positive, got {width}x{height} at {mpp} um/px")
        scale = mpp / self.mpp  # level-0 pixels per output pixel
        return self._read_scaled(x0, y0, width, height, scale, self.best_level(scale))

    def read_full(self, mpp: float) -> np.ndarray:
        """The whole slide at `mpp` um/px, (H, W, 3) uint8."""
        width, height = self.size_at(mpp)
        return self.read_rect(0, 0, width, height, self.mpp * self.dimensions[0] / width)

    def read_level(self, level: int) -> np.ndarray:
        """One pyramid level as stored, (H, W, 3) uint8 (what CLAM segments)."""
        width, height = self.level_dimensions[level]
        # the level's own downsample as the scale: every block is read 1:1, never resized
        return self._read_scaled(0, 0, width, height, self.level_downsamples[level], level)

    def _read_scaled(self, x0: float, y0: float, width: int, height: int, scale: float, level: int) -> np.ndarray:
        """(height, width, 3) output pixels of `scale` level-0 pixels each, starting at level-0 (x0, y0),
        read from `level` and resized to the output."""
        downsample = self.level_downsamples[level]
        out = np.empty((height, width, 3), np.uint8)
        # Large requests are read block by block; each block maps to its own level-0 window.
        for top in range(0, height, READ_BLOCK):
            for left in range(0, width, READ_BLOCK):
                h, w = min(READ_BLOCK, height - top), min(READ_BLOCK, width - left)
                bx, by = x0 + left * scale, y0 + top * scale
                lw, lh = max(1, round(w * scale / downsample)), max(1, round(h * scale / downsample))
                block = self._read_level_region(round(bx), round(by), level, lw, lh)
                out[top : top + h, left : left + w] = _resize(block, w, h)
        return out

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region((int(x0), int(y0)), level, (int(width), int(height))))
        except openslide.OpenSlideError as err:
            raise SlideError(f"tiles failed to decode near level-0 ({x0}, {y0}) at level {level}: {err}",
                             stage="read", slide=self.slide_id) from err
        return _composite_on_white(rgba)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> "WSI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WSI({self.slide_id!r}, {self.dimensions[0]}x{self.dimensions[1]}, {self.mpp:.4g} um/px)"


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an OpenSlide RGBA read; transparent pixels (outside the scanned area) become white, as
    background, rather than black, which tissue detection would call tissue-free but encoders see as ink."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrinking = image.shape[1] >= width and image.shape[0] >= height
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
