"""Tissue segmentation and patch grids on slides with known tissue shapes, and coordinate files."""
import cv2
import h5py
import numpy as np
import pytest

from datasets.patches import PatchParams, grid_for_slide, read_coords, write_coords
from datasets.slides import WSI, SlideError
from datasets.testing import tissue_image, write_pyramidal_tiff
from datasets.tissue import TISSUE_PRESETS, Tissue, TissueParams, segment_tissue, write_thumbnail

D = 4  # segmentation downsample used here; every edge below is a multiple of it
# level-0 (x, y, w, h) at 20x: A with a hole, B, and C too small to pass a_t
RECT_A, HOLE_A, RECT_B, RECT_C = (128, 128, 640, 512), (320, 256, 128, 128), (960, 512, 440, 380), (1200, 128, 32, 32)
PARAMS = TissueParams(seg_downsample=D, a_t=0.1, a_h=0.01)  # a_t 0.1 x 512^2 px: A and B pass, C doesn't


@pytest.fixture(scope="module")
def rect_slide(tmp_path_factory):
    image = tissue_image(1536, 1024, [RECT_A, RECT_B, RECT_C], holes=[HOLE_A], seed=2)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("rect") / "rects.tif", image, 0.5)


@pytest.fixture(scope="module")
def tissue(rect_slide):
    with WSI.open(rect_slide) as wsi:
        return segment_tissue(wsi, PARAMS)


def expected_grid(patch: int, step: int) -> np.ndarray:
    """CLAM's rule computed from the rectangles alone.

    At downsample D a rectangle covers segmentation pixels x0/D .. x1/D - 1. CLAM's 4 x 4 closing (an
    even kernel anchored at its centre, as OpenCV does it) moves the mask one pixel right and down, and
    CLAM scales contour vertices by D, so the tissue polygon is [x0 + D, x1] x [y0 + D, y1] (boundary
    included) and the grid runs over its bounding box. A hole's contour runs along the tissue pixels
    around it, moved likewise: [hx0, hx1 + D] x [hy0, hy1 + D]; a centre strictly inside drops the patch.
    """
    keep = []
    shift = patch // 4
    for x0, y0, w, h in (RECT_A, RECT_B):
        left, top, right, bottom = x0 + D, y0 + D, x0 + w, y0 + h
        for y in np.arange(top, bottom + 1, step):
            for x in np.arange(left, right + 1, step):
                cx, cy = x + patch // 2, y + patch // 2
                points = [(cx + dx, cy + dy) for dx in (-shift, shift) for dy in (-shift, shift)]
                if not any(left <= px <= right and top <= py <= bottom for px, py in points):
                    continue
                if (x0, y0) == RECT_A[:2]:
                    hx0, hy0, hw, hh = HOLE_A
                    if hx0 < cx < hx0 + hw + D and hy0 < cy < hy0 + hh + D:
                        continue
                keep.append((x, y))
    keep = np.array(keep, np.int64)
    return keep[np.lexsort((keep[:, 0], keep[:, 1]))]


def test_segmentation_finds_the_rectangles(tissue):
    found, image = tissue
    assert image.shape == (256, 384, 3) and found.seg_level == 2
    boxes = sorted(cv2.boundingRect(c) for c in found.contours)
    assert boxes == [(132, 132, 637, 509), (964, 516, 437, 377)]  # C is filtered out by a_t
    assert [len(h) for h in found.holes] in ([1, 0], [0, 1])
    expected_area = 640 * 512 - 128 * 128 + 440 * 380
    assert found.area == pytest.approx(expected_area, rel=0.03)


def test_area_filters_and_presets(rect_slide):
    with WSI.open(rect_slide) as wsi:
        small, _ = segment_tissue(wsi, TissueParams(seg_downsample=D, a_t=0.001, a_h=0.01))
        no_holes, _ = segment_tissue(wsi, TissueParams(seg_downsample=D, a_t=0.1, a_h=1.0))
        with pytest.raises(SlideError) as info:
            segment_tissue(wsi, TissueParams(seg_downsample=D, a_t=10))
    assert len(small.contours) == 3  # C kept with a tiny a_t
    assert sum(len(h) for h in no_holes.holes) == 0  # hole smaller than a_h
    assert info.value.stage == "tissue" and "no tissue" in info.value.reason
    assert (TISSUE_PRESETS["tcga"].a_t, TISSUE_PRESETS["tcga"].a_h) == (16, 4)
    assert (TISSUE_PRESETS["default"].a_t, TISSUE_PRESETS["default"].a_h, TISSUE_PRESETS["default"].sthresh) == (100, 16, 8)


def test_tissue_mask_save_load_and_thumbnail(tissue, tmp_path):
    found, image = tissue
    path = found.save(tmp_path / "tissue.h5")
    loaded = Tissue.load(path)
    assert all(np.array_equal(a, b) for a, b in zip(found.contours, loaded.contours))
    assert [len(h) for h in loaded.holes] == [len(h) for h in found.holes]
    mask = loaded.mask(192, 128)  # 8 level-0 px per mask pixel: A is rows 16-79, cols 16-95
    # A minus its hole; the median blur rounds corners, and the hole's outline is drawn as hole
    assert mask[17:80, 17:96].sum() == pytest.approx(63 * 79 - 16 * 16, rel=0.03)
    assert not mask[:16].any() and not mask[:, :16].any() and not mask[33:48, 41:56].any()
    assert mask.sum() == pytest.approx((640 * 512 - 128 * 128 + 440 * 380) / 64, rel=0.05)
    thumb = cv2.imread(str(write_thumbnail(image, found, tmp_path / "thumb.png")))
    assert thumb.shape == (256, 384, 3)
    green = (thumb[..., 1] > 150) & (thumb[..., 0] < 80) & (thumb[..., 2] < 80)
    assert green[33, 36:190].mean() > 0.9  # the top edge of A (moved a pixel by the closing) is outlined


@pytest.mark.parametrize("patch,step", [(64, None), (64, 48), (128, 128)])
def test_patch_grid_matches_independent_computation(rect_slide, tissue, patch, step):
    params = PatchParams(magnification=20, patch_size=patch, step=step)
    with WSI.open(rect_slide) as wsi:
        coords, attrs = grid_for_slide(wsi, tissue[0], params)
    np.testing.assert_array_equal(coords, expected_grid(patch, step or patch))
    assert attrs["patch_size_level0"] == patch


def test_grid_is_physical_on_a_40x_slide(tmp_path):
    """The same tissue scanned at 40x gives the 20x grid scaled by 2 (same physical patches)."""
    image20 = tissue_image(1536, 1024, [RECT_A, RECT_B], holes=[HOLE_A], seed=3)
    image40 = cv2.resize(image20, (3072, 2048), interpolation=cv2.INTER_NEAREST)
    grids = {}
    for mpp, image, d in ((0.5, image20, D), (0.25, image40, 2 * D)):
        path = write_pyramidal_tiff(tmp_path / f"{mpp}.tif", image, mpp)
        with WSI.open(path) as wsi:
            found, _ = segment_tissue(wsi, TissueParams(seg_downsample=d, a_t=0.01, a_h=0.001))
            grids[mpp], attrs = grid_for_slide(wsi, found, PatchParams(20, 64))
        if mpp == 0.25:
            assert attrs["patch_size_level0"] == 128 and attrs["patch_level"] == 1 and attrs["level0_magnification"] == 40
    np.testing.assert_array_equal(grids[0.25], 2 * grids[0.5])


def test_coords_file_has_clam_and_trident_attributes(rect_slide, tissue, tmp_path):
    with WSI.open(rect_slide) as wsi:
        coords, attrs = grid_for_slide(wsi, tissue[0], PatchParams())
    path = write_coords(tmp_path / "rects.h5", coords, attrs)
    with h5py.File(path) as f:
        stored = dict(f["coords"].attrs)
        np.testing.assert_array_equal(f["coords"][:], coords)
    clam = {"patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name"}
    trident = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
               "level0_width", "level0_height"}
    assert clam | trident <= set(stored)
    assert stored["patch_level"] == 0 and list(stored["level_dim"]) == [1536, 1024]
    back, meta = read_coords(path)
    np.testing.assert_array_equal(back, coords)
    assert meta["format"] == "wsi-bench" and meta["patch_size"] == 256 and meta["patch_size_level0"] == 256
    assert meta["level0_mpp"] == pytest.approx(0.5) and meta["target_magnification"] == 20


def test_reads_clam_coords(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 512]], np.int64)
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # as CLAM's create_patches_fp.py writes it
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0]),
                        "downsampled_level_dim": np.array([5000, 4000]), "level_dim": np.array([10000, 8000]),
                        "name": "slide", "save_path": "/x/patches"})
    back, meta = read_coords(tmp_path / "clam.h5")
    np.testing.assert_array_equal(back, coords)
    assert meta["format"] == "clam" and meta["patch_size"] == 256 and meta["patch_size_level0"] == 512
    assert meta["patch_level"] == 1 and (meta["level0_width"], meta["level0_height"]) == (10000, 8000)
    assert meta["target_magnification"] is None and meta["level0_mpp"] is None


def test_reads_trident_coords(tmp_path):
    coords = np.array([[10, 20], [522, 20]], np.int64)
    with h5py.File(tmp_path / "slide_patches.h5", "w") as f:  # as TRIDENT's patcher writes it
        d = f.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "slide", "savetodir": "/x"})
    back, meta = read_coords(tmp_path / "slide_patches.h5")
    np.testing.assert_array_equal(back, coords)
    assert meta["format"] == "trident" and (meta["patch_size"], meta["patch_size_level0"]) == (256, 512)
    assert (meta["level0_magnification"], meta["target_magnification"]) == (40, 20)


def test_unknown_coords_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["coords"] = np.zeros((2, 2), np.int64)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["features"] = np.zeros((2, 2))
    for name in ("bare.h5", "other.h5"):
        with pytest.raises(ValueError):
            read_coords(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_coords(tmp_path / "missing.h5")
