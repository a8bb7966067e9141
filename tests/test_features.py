"""Feature extraction: the right patch behind each row, CLAM/TRIDENT-readable files, skipping, failures."""
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from datasets.cache import slide_key
from datasets.patches import PatchParams, read_coords
from datasets.preprocess import preprocess_slides
from datasets.slides import WSI
from datasets.testing import corrupt_tiles, tissue_image, write_pyramidal_tiff
from datasets.tissue import TissueParams
from methods.encoders.base import PatchEncoder, Preprocess
from methods.features import (
    SlideFeatureJob,
    benchmark,
    extract_features,
    extract_slides,
    feature_attrs,
    feature_folder,
    load_features,
    main,
    shard,
    slide_table,
)

TISSUE = TissueParams(seg_downsample=4, a_t=0.1, a_h=0.01)
PATCH = PatchParams(magnification=20, patch_size=64)


class MeanColour(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def mean_colour_encoder(name="mean_colour") -> PatchEncoder:
    """Features = mean RGB in [0, 1]: each row can be checked against the patch read independently."""
    return PatchEncoder(name, MeanColour(), 3, Preprocess(64, 64, "bilinear", (0, 0, 0), (1, 1, 1)), "random")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    paths = {
        "a": write_pyramidal_tiff(d / "a.tif", tissue_image(768, 512, [(64, 64, 384, 256)], seed=1), 0.5),
        "b": write_pyramidal_tiff(d / "b.svs", tissue_image(1024, 1024, [(0, 128, 512, 512)], color=(120, 60, 150), seed=2),
                                  0.25, aperio=True, app_mag=40),
    }
    paths["bad"] = corrupt_tiles(paths["a"], d / "bad.tif", page=0)  # level 0 broken: grid fine, patches not
    return pd.DataFrame({"slide_id": list(paths), "path": [str(p) for p in paths.values()]})


@pytest.fixture(scope="module")
def grids(slides, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return preprocess_slides(slides, cache, patch=PATCH, tissue=TISSUE, progress=False)


def jobs_for(slides, grids, folder, ids=("a", "b", "bad")):
    paths = dict(zip(slides.slide_id, slides.path))
    return [SlideFeatureJob(s, paths[s], grids[s].patches, folder / f"{s}.h5") for s in ids]


def test_each_row_is_the_patch_at_its_coordinates(slides, grids, tmp_path):
    report = extract_features(jobs_for(slides, grids, tmp_path, ("a", "b")), mean_colour_encoder(), progress=False)
    assert set(report.done) == {"a", "b"} and report.patches > 0
    for slide_id in ("a", "b"):
        features, coords = load_features(report.done[slide_id])
        grid, attrs = read_coords(grids[slide_id].patches)
        np.testing.assert_array_equal(coords, grid)
        with WSI.open(slides.set_index("slide_id").path[slide_id]) as wsi:
            mpp = wsi.mpp * attrs["patch_size_level0"] / attrs["patch_size"]
            for row in (0, len(coords) // 2, len(coords) - 1):
                patch = wsi.read(*map(int, coords[row]), 64, mpp)
                np.testing.assert_allclose(features[row].numpy(), patch.reshape(-1, 3).mean(0) / 255, atol=1e-5)


def test_file_has_clam_and_trident_layout(slides, grids, tmp_path):
    report = extract_features(jobs_for(slides, grids, tmp_path, ("b",)), mean_colour_encoder(), progress=False)
    with h5py.File(report.done["b"], "r") as f:  # what CLAM's and TRIDENT's readers do
        features, coords = f["features"][:], f["coords"][:]
        coords_attrs = dict(f["coords"].attrs)
        root = dict(f.attrs)
        assert f["features"].attrs["encoder"] == "mean_colour"
    assert features.dtype == np.float32 and features.shape == (len(coords), 3)
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    # slide b is 40x (0.25 um/px): 64 px at 20x are 128 level-0 px
    assert coords_attrs["patch_size"] == 64 and coords_attrs["patch_size_level0"] == 128
    assert coords_attrs["level0_magnification"] == 40 and coords_attrs["target_magnification"] == 20
    assert (coords_attrs["level0_width"], coords_attrs["level0_height"]) == (1024, 1024)
    assert "patch_level" in coords_attrs and coords_attrs["name"] == "b"
    assert root["encoder"] == "mean_colour" and root["slide_id"] == "b"
    assert root["slide_key"] == slide_key(slides.set_index("slide_id").path["b"])
    assert json.loads(root["preprocessing"])["input_size"] == 64


def test_existing_files_are_skipped_and_stale_ones_rebuilt(slides, grids, tmp_path):
    jobs = jobs_for(slides, grids, tmp_path, ("a", "b"))
    first = extract_features(jobs, mean_colour_encoder(), progress=False)
    stamp = first.done["a"].stat().st_mtime_ns
    built = []

    def factory():
        built.append(1)
        return mean_colour_encoder()

    again = extract_features(jobs, factory, encoder_name="mean_colour", progress=False)
    assert again.skipped == ["a", "b"] and again.patches == 0 and not built  # encoder never built
    assert first.done["a"].stat().st_mtime_ns == stamp
    other = extract_features(jobs, mean_colour_encoder("other_encoder"), progress=False)
    assert sorted(other.done) == ["a", "b"] and other.skipped == [] and other.patches == first.patches


def test_done_slides_are_recognised_without_opening_them(slides, grids, tmp_path, monkeypatch):
    jobs = jobs_for(slides, grids, tmp_path, ("a", "b"))
    first = extract_features(jobs, mean_colour_encoder(), progress=False)
    first.done["b"].unlink()  # b is to be redone
    opened, real_open = [], WSI.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).stem)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(WSI, "open", recording_open)
    again = extract_features(jobs, mean_colour_encoder(), progress=False)
    assert again.skipped == ["a"] and sorted(again.done) == ["a", "b"] and not again.failed
    assert "a" not in opened and "b" in opened

    def refusing_open(path, *args, **kwargs):
        raise AssertionError(f"{path} was opened although its features are done")

    monkeypatch.setattr(WSI, "open", refusing_open)
    cached = extract_features(jobs, mean_colour_encoder(), progress=False)
    assert cached.skipped == ["a", "b"] and not cached.failed


def test_a_done_file_of_a_replaced_slide_file_is_rebuilt(slides, grids, tmp_path):
    """The skip without opening still checks that the file was made from this very slide file."""
    copy = Path(shutil.copy(slides.set_index("slide_id").path["a"], tmp_path / "a.tif"))
    job = SlideFeatureJob("a", copy, grids["a"].patches, tmp_path / "features" / "a.h5")
    first = extract_features([job], mean_colour_encoder(), progress=False)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # the file replaced in place
    again = extract_features([job], mean_colour_encoder(), progress=False)
    assert again.skipped == [] and again.patches == first.patches
    assert feature_attrs(again.done["a"])["slide_key"] == slide_key(copy)


def test_slide_folders_are_searched_with_discoverys_extensions(tmp_path):
    for name in ("x.svs", "y.vmu", "notes.txt"):  # .vmu: a slide to discovery, not to features' old list
        (tmp_path / name).touch()
    assert slide_table([tmp_path]).slide_id.tolist() == ["x", "y"]


def test_corrupt_slide_fails_alone_and_leaves_no_file(slides, grids, tmp_path):
    report = extract_features(jobs_for(slides, grids, tmp_path), mean_colour_encoder(), batch_size=7, progress=False)
    assert set(report.done) == {"a", "b"}
    assert "decode" in report.failed["bad"]
    assert not (tmp_path / "bad.h5").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_dataloader_workers_give_the_same_features(slides, grids, tmp_path):
    serial = extract_features(jobs_for(slides, grids, tmp_path / "0", ("a", "b")), mean_colour_encoder(), progress=False)
    parallel = extract_features(jobs_for(slides, grids, tmp_path / "2", ("a", "b")), mean_colour_encoder(),
                                num_workers=2, batch_size=5, progress=False)
    for slide_id in ("a", "b"):
        torch.testing.assert_close(load_features(serial.done[slide_id])[0], load_features(parallel.done[slide_id])[0])


def test_load_features_reads_clam_and_trident_files(tmp_path):
    rng = np.random.default_rng(0)
    feats, coords = rng.normal(size=(5, 8)).astype(np.float32), rng.integers(0, 1000, size=(5, 2))
    with h5py.File(tmp_path / "clam.h5", "w") as f:  # CLAM: bare datasets
        f["features"], f["coords"] = feats, coords
    with h5py.File(tmp_path / "trident.h5", "w") as f:  # TRIDENT: attributes on both datasets
        f.create_dataset("features", data=feats).attrs["name"] = "trident"
        d = f.create_dataset("coords", data=coords.astype(np.int32))
        d.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20})
    for name in ("clam.h5", "trident.h5"):
        got, got_coords = load_features(tmp_path / name)
        np.testing.assert_array_equal(got.numpy(), feats)
        assert got_coords.dtype == np.int64 and (got_coords == coords).all()
    with pytest.raises(ValueError, match="no coordinates"):
        load_features(tmp_path / "slide.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_features(tmp_path / "missing.h5")


def test_feature_folder_is_keyed_by_everything_that_changes_features(tmp_path):
    base = feature_folder(tmp_path, "resnet50_trunc", "hub", None, PATCH)
    assert base.parent.name.startswith("resnet50_trunc__") and base.name == "h5_files"
    assert base == feature_folder(tmp_path, "resnet50_trunc", None, None, PATCH)  # default weights = hub
    for other in (feature_folder(tmp_path, "conch_v1", "hub", None, PATCH),
                  feature_folder(tmp_path, "resnet50_trunc", "random", None, PATCH),
                  feature_folder(tmp_path, "resnet50_trunc", "hub", 112, PATCH),
                  feature_folder(tmp_path, "resnet50_trunc", "hub", None, PatchParams(20, 512))):
        assert other != base
    assert "/" not in feature_folder(tmp_path, "timm:hf-hub:MahmoodLab/UNI", "hub", None, PATCH).parent.name


def test_slide_stage_then_features_with_a_real_encoder(slides, tmp_path):
    """resnet50_trunc (random weights, small input) through the whole path, and --bench's numbers."""
    from datasets.quarantine import Quarantine

    quarantine = Quarantine(tmp_path / "quarantine.csv")
    report = extract_slides(slides, tmp_path / "cache", "resnet50_trunc", weights="random", input_size=32,
                            patch=PATCH, tissue=TISSUE, progress=False, quarantine=quarantine)
    assert set(report.done) == {"a", "b"}
    assert load_features(report.done["a"])[0].shape[1] == 1024
    assert {(r["slide_id"], r["stage"]) for r in quarantine.records} == {("bad", "features")}
    stats = benchmark(slides[slides.slide_id == "a"], "resnet50_trunc", weights="random", input_size=32, patch=PATCH,
                      tissue=TISSUE, device="cpu", batch_size=16, num_workers=0, cache_dir=tmp_path / "cache")
    assert stats["patches"] == len(load_features(report.done["a"])[1]) and stats["patches_per_s"] > 0


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path)]) == 2
    assert "no slide file or folder" in capsys.readouterr().err
    table = pd.DataFrame({"slide_id": list("abcde"), "path": list("abcde")})
    assert shard(table, "1/2").slide_id.tolist() == ["b", "d"]
    with pytest.raises(ValueError, match="--shard takes i/n"):
        shard(table, "3/2")
