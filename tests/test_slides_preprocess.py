"""Preprocessing a set of slides: products, quarantine reasons, strict mode, cache reuse, 2.5x images."""
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import datasets.preprocess as preprocess_module
from datasets.cache import atomic_path, params_key, slide_key
from datasets.cohorts.discovery import SLIDE_EXTENSIONS
from datasets.lowres import LowresParams, TissueImage, random_regions, tissue_mask
from datasets.patches import PatchParams, read_coords
from datasets.preprocess import preprocess_slides
from datasets.quarantine import Quarantine
from datasets.slides import WSI, SlideError
from datasets.testing import corrupt_tiles, tissue_image, truncated_copy, write_pyramidal_tiff
from datasets.tissue import Tissue, TissueParams

TISSUE = TissueParams(seg_downsample=4, a_t=0.1, a_h=0.01)
PATCH = PatchParams(magnification=20, patch_size=64)
LOWRES = LowresParams(mpp=4.0, region_size=8, min_tissue=0.25)
RECTS = [(128, 128, 640, 512), (960, 512, 448, 384)]  # level-0 at 20x, multiples of 64
COLOR = (180, 90, 160)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    image = tissue_image(1536, 1024, RECTS, color=COLOR, seed=4)
    paths = {
        "svs": write_pyramidal_tiff(d / "svs.svs", image, 0.5, aperio=True, app_mag=20),
        "tif": write_pyramidal_tiff(d / "tif.tif", image, 0.5),
        "no_mpp": write_pyramidal_tiff(d / "no_mpp.tif", image, None),
        "white": write_pyramidal_tiff(d / "white.tif", np.full((512, 512, 3), 255, np.uint8), 0.5),
    }
    paths["truncated"] = truncated_copy(paths["tif"], d / "truncated.tif")
    paths["corrupt"] = corrupt_tiles(paths["tif"], d / "corrupt.tif")
    paths["missing"] = d / "missing.svs"
    return pd.DataFrame({"slide_id": list(paths), "path": [str(p) for p in paths.values()]})


def run(cohort, cache_dir, **kw):
    kw = {"products": ("tissue", "patches"), "patch": PATCH, "tissue": TISSUE, "progress": False, **kw}
    return preprocess_slides(cohort, cache_dir, **kw)


def test_good_slides_get_products_and_bad_ones_the_right_reason(cohort, tmp_path):
    quarantine = Quarantine(tmp_path / "quarantine" / "cohort.csv")
    done = run(cohort, tmp_path / "cache", quarantine=quarantine)
    assert list(done) == ["svs", "tif"]
    reasons = {r["slide_id"]: (r["stage"], r["reason"]) for r in quarantine.records}
    assert set(reasons) == {"no_mpp", "white", "truncated", "corrupt", "missing"}
    assert reasons["no_mpp"][0] == "open" and "MPP" in reasons["no_mpp"][1]
    assert reasons["white"][0] == "tissue" and "no tissue" in reasons["white"][1]
    assert reasons["truncated"][0] == "open" and "OpenSlide cannot read it" in reasons["truncated"][1]
    assert reasons["corrupt"][0] == "tissue" and "decode" in reasons["corrupt"][1]
    assert reasons["missing"][0] == "open" and "not found" in reasons["missing"][1]
    written = pd.read_csv(quarantine.path)
    assert list(written.columns) == ["slide_id", "stage", "reason"] and len(written) == 5

    products = done["svs"]
    assert products.tissue.parent == tmp_path / "cache" / "slides" / slide_key(cohort.path[0])
    assert products.thumbnail.suffix == ".png" and products.thumbnail.stat().st_size > 0
    coords_svs, _ = read_coords(products.patches)
    coords_tif, _ = read_coords(done["tif"].patches)
    np.testing.assert_array_equal(coords_svs, coords_tif)  # same image, two formats
    assert len(Tissue.load(products.tissue).contours) == 2 and len(coords_svs) > 50


def test_default_mpp_accepts_the_slide_without_mpp(cohort, tmp_path):
    pair = cohort[cohort.slide_id.isin(["no_mpp", "tif"])]
    run(pair, tmp_path, quarantine=Quarantine(tmp_path / "q.csv"))
    assert Quarantine(tmp_path / "q.csv").slide_ids == {"no_mpp"}
    quarantine = Quarantine(tmp_path / "q.csv")
    done = run(pair, tmp_path, default_mpp=0.5, quarantine=quarantine)
    assert set(done) == {"no_mpp", "tif"} and not Quarantine(tmp_path / "q.csv").records  # the fixed slide is off
    np.testing.assert_array_equal(read_coords(done["no_mpp"].patches)[0], read_coords(done["tif"].patches)[0])


def test_strict_makes_the_first_error_fatal(cohort, tmp_path):
    with pytest.raises(SlideError) as info:
        run(cohort[cohort.slide_id.isin(["tif", "white"])], tmp_path, strict=True)
    assert info.value.stage == "tissue"


def test_a_second_run_does_no_work(cohort, tmp_path, monkeypatch):
    good = cohort[cohort.slide_id.isin(["svs", "tif"])]
    first = run(good, tmp_path, products=("tissue", "patches", "lowres"), lowres=LOWRES)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}

    def no_open(*args, **kwargs):
        raise AssertionError("a cached slide was opened again")

    monkeypatch.setattr(preprocess_module.WSI, "open", no_open)
    second = run(good, tmp_path, products=("tissue", "patches", "lowres"), lowres=LOWRES)
    assert second == first
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files)
    # other parameters are other products: the slide must be opened again
    with pytest.raises(AssertionError, match="opened again"):
        run(good, tmp_path, patch=PatchParams(magnification=20, patch_size=128), strict=True)


def test_a_cached_slide_is_planned_once(cohort, tmp_path, monkeypatch):
    good = cohort[cohort.slide_id.isin(["svs", "tif"])]
    first = run(good, tmp_path)
    plan, planned = preprocess_module.planned_products, []

    def counting(job):
        planned.append(job.slide_id)
        return plan(job)

    monkeypatch.setattr(preprocess_module, "planned_products", counting)
    assert run(good, tmp_path) == first
    assert planned == ["svs", "tif"]


def test_command_line_scans_the_folder_for_every_slide_extension(tmp_path, monkeypatch):
    folder = tmp_path / "slides"
    (folder / "sub").mkdir(parents=True)
    for ext in SLIDE_EXTENSIONS:
        (folder / "sub" / f"slide_{ext[1:]}{ext}").touch()
    (folder / "notes.txt").touch()
    tables = []

    def record(table, cache_dir, **kw):
        tables.append(table)
        return {}

    monkeypatch.setattr(preprocess_module, "preprocess_slides", record)
    preprocess_module.main([str(folder), "--cache-dir", str(tmp_path / "cache")])
    assert sorted(Path(p).suffix for p in tables[0]["path"]) == sorted(SLIDE_EXTENSIONS)


def test_a_replaced_slide_file_is_processed_again(cohort, tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(open(cohort.path[1], "rb").read())
    table = pd.DataFrame({"slide_id": ["s"], "path": [str(path)]})
    first = run(table, tmp_path / "cache")["s"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = run(table, tmp_path / "cache")["s"]
    assert first.patches.parent != second.patches.parent and second.patches.exists()


def test_worker_processes_give_the_same_products(cohort, tmp_path):
    quarantine = Quarantine(None)
    parallel = run(cohort[cohort.slide_id.isin(["svs", "tif", "white"])], tmp_path / "a", workers=2,
                   quarantine=quarantine)
    serial = run(cohort[cohort.slide_id.isin(["svs", "tif"])], tmp_path / "b")
    assert list(parallel) == ["svs", "tif"] and [r["slide_id"] for r in quarantine.records] == ["white"]
    for slide_id in serial:
        np.testing.assert_array_equal(read_coords(parallel[slide_id].patches)[0],
                                      read_coords(serial[slide_id].patches)[0])


def test_tissue_image_product(cohort, tmp_path):
    done = run(cohort[cohort.slide_id == "tif"], tmp_path, products=("lowres",), lowres=LOWRES)
    image = TissueImage.load(done["tif"].lowres)
    assert isinstance(image.image, np.memmap) and isinstance(image.mask, np.memmap)
    # 1536 x 1024 at 0.5 um/px -> 192 x 128 at 4 um/px, already a multiple of R = 8
    assert image.image.shape == (128, 192, 3) and image.mask.shape == (128, 192) and image.region_size == 8
    # the tissue rectangles at 4 um/px: A covers region rows 2-9, cols 2-11, B rows 8-13, cols 15-21
    grid = np.zeros((16, 24), bool)
    for x, y, w, h in RECTS:
        grid[y // 64 : (y + h) // 64, x // 64 : (x + w) // 64] = True
    np.testing.assert_array_equal(image.regions, np.argwhere(grid))
    assert (image.tissue_fraction >= 0.25).all() and np.median(image.tissue_fraction) == 1.0
    # away from the edges (where a 4 um pixel is part tissue), masked pixels are tissue, the rest white
    inner = cv2.erode(image.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    outer = ~cv2.dilate(image.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert np.abs(image.image[inner].astype(int) - COLOR).max() < 20 and (image.image[outer] == 255).all()
    region_image, region_mask = image.region(0)
    assert region_image.shape == (8, 8, 3) and region_mask.mean() == image.tissue_fraction[0]


def test_random_regions_are_centred_in_tissue_and_seeded(cohort, tmp_path):
    done = run(cohort[cohort.slide_id == "tif"], tmp_path, products=("lowres",), lowres=LOWRES)
    image = TissueImage.load(done["tif"].lowres)
    with WSI.open(cohort.path[1]) as wsi:
        regions = random_regions(wsi, image, 12, 32, 1.0, seed=0)
        again = random_regions(wsi, done["tif"].lowres, 12, 32, 1.0, seed=0)
        other = random_regions(wsi, Tissue.load(done["tif"].tissue), 12, 32, 1.0, seed=1)
        prebuilt = random_regions(wsi, tissue_mask(image, wsi), 12, 32, 1.0, seed=0)  # mask built once, reused
    np.testing.assert_array_equal(prebuilt, regions)
    assert regions.shape == (12, 32, 32, 3) and regions.dtype == np.uint8
    np.testing.assert_array_equal(regions, again)
    assert not np.array_equal(regions, other)
    # every centre lies in tissue up to the mask's resolution (4 um) plus the segmentation's (2 um)
    near_centre = np.concatenate([regions, other])[:, 10:22, 10:22].reshape(24, -1, 3).astype(int)
    assert (np.abs(near_centre - COLOR).max(axis=2) < 20).any(axis=1).all()


def test_bad_arguments(cohort, tmp_path):
    with pytest.raises(ValueError, match="unknown products"):
        run(cohort, tmp_path, products=("features",))
    with pytest.raises(ValueError, match="unique"):
        run(pd.concat([cohort, cohort]), tmp_path)
    with pytest.raises(ValueError, match="path"):
        run(cohort[["slide_id"]], tmp_path)


def test_cache_keys():
    a = {"patch": PatchParams(20, 256), "mpp": 0.5}
    assert params_key(a) == params_key({"mpp": 0.5, "patch": PatchParams(20.0, 256)})
    assert params_key(a) != params_key({"patch": PatchParams(20, 512), "mpp": 0.5})
    assert len(params_key(a)) == 12


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "sub" / "product.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list((tmp_path / "sub").iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list((tmp_path / "sub").iterdir()) == [target]
    folder = tmp_path / "folder"
    for text in ("first", "second"):  # a folder already in place is kept
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text(text)
    assert (folder / "a.txt").read_text() == "first" and sorted(tmp_path.iterdir()) == [folder, tmp_path / "sub"]


def test_quarantine_merges_and_forgets(tmp_path):
    path = tmp_path / "q.csv"
    first = Quarantine(path)
    first.add("a", "open", "no MPP\nat all")
    first.add("b", "tissue", "no tissue")
    first.write()
    second = Quarantine(path)
    assert second.records[0] == {"slide_id": "a", "stage": "open", "reason": "no MPP at all"}
    second.discard("b", ("tissue",))
    second.add("c", "lowres", "no region")
    assert second.slide_ids == {"a", "c"}
