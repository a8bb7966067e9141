"""Small slides for tests: pyramidal JPEG-tiled TIFFs that OpenSlide opens, and ways to break them.

Real slides are hundreds of MB; these are a few hundred to a few thousand pixels wide, written in
milliseconds, so every test can build exactly the slide it needs (see docs/slides.md).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import tifffile


def pyramid_levels(image: np.ndarray, levels: int | None, tile: int) -> list[np.ndarray]:
    """Level 0 and its successive halvings; `levels=None` halves until the level fits in one tile."""
    pyramid = [image]
    while levels is None or len(pyramid) < levels:
        h, w = pyramid[-1].shape[:2]
        if levels is None and max(h, w) <= tile:
            break
        if min(h, w) < 2:
            raise ValueError(f"cannot build {levels} levels from a {image.shape[1]}x{image.shape[0]} image")
        pyramid.append(cv2.resize(pyramid[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    return pyramid


def aperio_description(width: int, height: int, tile: int, mpp: float | None, app_mag: float | None) -> str:
    """An ImageDescription as Aperio scanners write it: OpenSlide's Aperio driver keys on the prefix
    and parses the `|key = value` fields (MPP, AppMag)."""
    fields = [f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=90"]
    if app_mag is not None:
        fields.append(f"AppMag = {app_mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:g}")
    return "|".join(fields)


def write_pyramidal_tiff(
    path,
    image_rgb_uint8: np.ndarray,
    mpp: float | None,
    *,
    levels: int | None = None,
    aperio: bool = False,
    app_mag: float | None = None,
    tile: int = 256,
) -> Path:
    """Write `image_rgb_uint8` (H, W, 3) as a JPEG-tiled pyramidal TIFF that OpenSlide opens.

    Generic TIFF (aperio=False): the MPP goes into the resolution tags (pixels per centimetre), which
    OpenSlide's generic-tiff driver reads; mpp=None writes no physical resolution at all.
    SVS-like (aperio=True): an Aperio ImageDescription carrying `MPP` (when mpp is given) and `AppMag`
    (when app_mag is given); OpenSlide then uses its Aperio driver.
    Each level is half the size of the one before, as a top-level page (OpenSlide ignores SubIFDs).
    """
    image = np.ascontiguousarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (TIFF rule), got {tile}")
    path = Path(path)
    height, width = image.shape[:2]
    description = aperio_description(width, height, tile, mpp, app_mag) if aperio else None
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for index, level in enumerate(pyramid_levels(image, levels, tile)):
            resolution = {}
            if mpp is not None and not aperio:
                resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subsampling=(1, 1),  # no chroma subsampling: tissue edges stay where the image puts them
                subfiletype=0 if index == 0 else 1,
                description=description if index == 0 else None,
                metadata=None,
                **resolution,
            )
    return path


def truncated_copy(src, dst, fraction: float = 0.5) -> Path:
    """The first `fraction` of `src`'s bytes: what an interrupted download leaves behind."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def corrupt_tiles(src, dst, page: int | None = None) -> Path:
    """Copy `src` and zero the start of every tile of `page` (default: every page), so JPEG decoding of
    those tiles fails ("Not a JPEG file") while the TIFF structure still opens."""
    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tf:
        pages = tf.pages if page is None else [tf.pages[page]]
        spans = [(off, n) for p in pages for off, n in zip(p.dataoffsets, p.databytecounts) if n]
    with open(dst, "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\0" * min(count, 64))
        f.flush()
        os.fsync(f.fileno())
    return Path(dst)


def tissue_image(
    width: int,
    height: int,
    rects: list[tuple[int, int, int, int]],
    *,
    color: tuple[int, int, int] = (180, 90, 160),
    holes: list[tuple[int, int, int, int]] = (),
    seed: int = 0,
) -> np.ndarray:
    """A white (H, W, 3) image with pink 'tissue' rectangles (x, y, w, h) and white holes cut in them.

    A faint seeded texture keeps the JPEG encoder honest without changing which pixels are tissue
    (saturation stays far above / below CLAM's threshold of 8).
    """
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    for x, y, w, h in rects:
        image[y : y + h, x : x + w] = color
    for x, y, w, h in holes:
        image[y : y + h, x : x + w] = 255
    tissue = (image != 255).any(axis=2)
    noise = rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    textured = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    image[tissue] = textured[tissue]
    return image
