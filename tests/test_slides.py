"""Slide access: MPP resolution, reads at a physical resolution, 20x vs 40x, broken files."""
import cv2
import numpy as np
import openslide
import pytest

import datasets.slides as slides_module
from datasets.slides import MAGNIFICATION_MPP, WSI, SlideError
from datasets.testing import corrupt_tiles, tissue_image, truncated_copy, write_pyramidal_tiff

# 40x image: two tissue rectangles with a hole, edges on multiples of 16 so every pyramid level is exact
RECTS_40X = [(256, 256, 1024, 768), (1536, 1024, 384, 384)]
HOLES_40X = [(512, 512, 256, 256)]


@pytest.fixture(scope="module")
def image40():
    return tissue_image(2048, 1536, RECTS_40X, holes=HOLES_40X, seed=1)


@pytest.fixture(scope="module")
def image20(image40):
    return cv2.resize(image40, (1024, 768), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, image40, image20):
    d = tmp_path_factory.mktemp("slides")
    return {
        "svs40": write_pyramidal_tiff(d / "svs40.svs", image40, 0.25, aperio=True, app_mag=40),
        "tif20": write_pyramidal_tiff(d / "tif20.tif", image20, 0.5),
        "mag_only": write_pyramidal_tiff(d / "mag_only.svs", image20, None, aperio=True, app_mag=20),
        "no_mpp": write_pyramidal_tiff(d / "no_mpp.tif", image20, None),
        "truncated": truncated_copy(d / "tif20.tif", d / "truncated.tif", 0.5),
        "corrupt": corrupt_tiles(d / "tif20.tif", d / "corrupt.tif"),
    }


def test_mpp_from_aperio_description_and_resolution_tags(slides):
    with WSI.open(slides["svs40"]) as svs, WSI.open(slides["tif20"]) as tif:
        assert svs.properties["openslide.vendor"] == "aperio"
        assert svs.mpp == pytest.approx(0.25) and svs.mpp_source == "openslide.mpp"
        assert svs.magnification == pytest.approx(40)
        assert tif.properties["openslide.vendor"] == "generic-tiff"
        assert tif.mpp == pytest.approx(0.5) and tif.dimensions == (1024, 768)
        assert tif.slide_id == "tif20"


def test_mpp_falls_back_to_objective_power(slides):
    with WSI.open(slides["mag_only"]) as wsi:
        assert wsi.mpp == pytest.approx(MAGNIFICATION_MPP[20]) and wsi.mpp_source == "openslide.objective-power"


def test_slide_without_mpp_fails_unless_default_given(slides):
    with pytest.raises(SlideError) as info:
        WSI.open(slides["no_mpp"])
    assert info.value.stage == "open" and "MPP" in info.value.reason and "default_mpp" in info.value.reason
    assert "\n" not in str(info.value)
    with WSI.open(slides["no_mpp"], default_mpp=0.5) as wsi:
        assert wsi.mpp == 0.5 and wsi.mpp_source == "default_mpp"
    with WSI.open(slides["tif20"], default_mpp=0.3) as wsi:  # the slide's own MPP wins over the default
        assert wsi.mpp == pytest.approx(0.5)


def test_unreadable_files_raise_slide_error(slides, tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide")
    for path in (slides["truncated"], junk, tmp_path / "missing.svs"):
        with pytest.raises(SlideError) as info:
            WSI.open(path)
        assert info.value.stage == "open"


def test_corrupt_tiles_raise_slide_error_on_read(slides):
    with WSI.open(slides["corrupt"]) as wsi, pytest.raises(SlideError) as info:
        wsi.read(0, 0, 64, 0.5)
    assert info.value.stage == "read" and "decode" in info.value.reason


def test_read_at_level0_matches_source(slides, image20):
    with WSI.open(slides["tif20"]) as wsi:
        patch = wsi.read(100, 200, 128, 0.5)
    assert patch.shape == (128, 128, 3) and patch.dtype == np.uint8
    assert np.abs(patch.astype(int) - image20[200:328, 100:228]).mean() < 3  # JPEG q95


def test_read_downsampled_matches_area_resize(slides, image20):
    with WSI.open(slides["tif20"]) as wsi:
        assert wsi.best_level(2.0) == 1 and wsi.best_level(3.0) == 1 and wsi.best_level(0.7) == 0
        patch = wsi.read(256, 256, 100, 1.5)  # downsample 3: read from level 1, resized
    expected = cv2.resize(image20[256:556, 256:556], (100, 100), interpolation=cv2.INTER_AREA)
    assert np.abs(patch.astype(int) - expected).mean() < 4


def test_20x_and_40x_give_the_same_physical_patch(slides):
    with WSI.open(slides["svs40"]) as w40, WSI.open(slides["tif20"]) as w20:
        for x20, y20 in [(64, 64), (300, 300), (700, 480), (900, 600)]:
            p20 = w20.read(x20, y20, 128, 0.5)
            p40 = w40.read(2 * x20, 2 * y20, 128, 0.5)
            assert np.abs(p20.astype(int) - p40).mean() < 3
        # and at 2.5x the whole slides agree
        full20, full40 = w20.read_full(4.0), w40.read_full(4.0)
    assert full20.shape == full40.shape == (96, 128, 3)
    assert np.abs(full20.astype(int) - full40).mean() < 3


def test_read_outside_the_slide_is_white(slides):
    with WSI.open(slides["tif20"]) as wsi:
        patch = wsi.read(1000, 740, 64, 0.5)  # 24 x 28 pixels inside, the rest outside
    assert (patch[40:, :] == 255).all() and (patch[:, 30:] == 255).all()


def test_bad_read_arguments(slides):
    with WSI.open(slides["tif20"]) as wsi, pytest.raises(ValueError):
        wsi.read(0, 0, 0, 0.5)


def test_read_level_is_read_rect_at_the_level_resolution(slides, monkeypatch):
    monkeypatch.setattr(slides_module, "READ_BLOCK", 100)  # many blocks, ragged at the edges
    with WSI.open(slides["svs40"]) as wsi, openslide.OpenSlide(slides["svs40"]) as raw:
        assert len(wsi.level_dimensions) > 2
        for level, (width, height) in enumerate(wsi.level_dimensions):
            stored = np.asarray(raw.read_region((0, 0), level, (width, height)))[..., :3]
            image = wsi.read_level(level)
            np.testing.assert_array_equal(image, stored)  # as stored: no resize, no offset
            mpp = wsi.mpp * wsi.level_downsamples[level]
            np.testing.assert_array_equal(wsi.read_rect(0, 0, width, height, mpp), image)
