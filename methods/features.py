"""Patch features: from slide files and patch grids to one h5 per (slide, encoder, patch settings).

    <cache_dir>/features/<encoder>__<params_key>/h5_files/<slide_id>.h5
        features (N, D) float32   attrs: name, encoder
        coords   (N, 2) int64     level-0 top-left corners, with CLAM's and TRIDENT's attributes
                                  (patch_size, patch_level, patch_size_level0, level0_magnification,
                                  target_magnification, level0_width/height, ...)
        root attrs: encoder, encoder_weights, embed_dim, preprocessing (JSON), slide_id, slide_key, ...

Patches are read through OpenSlide (datasets.slides.WSI) in DataLoader workers and batched; the
encoder's preprocessing (resize, normalise) runs on the batch on the device, under bf16 autocast and
channels-last on CUDA. Existing valid files are skipped without opening their slides; files appear
only complete (atomic writes); a slide whose tiles fail to decode is reported and the others go on.
`extract_features` works on a list of slides, so a launcher can give each GPU its own share
(`--shard i/n` on the command line).

Command line:
    python -m methods.features SLIDES... --cache-dir DIR [--encoder resnet50_trunc] [--weights hub|PATH|random]
    python -m methods.features SLIDES... --bench [--device cuda] ...   # patches/s, slide files to features
"""
from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datasets.cache import atomic_path, params_key, slide_key
from datasets.cohorts.discovery import SLIDE_EXTENSIONS
from datasets.patches import PatchParams, read_coords
from datasets.slides import WSI, SlideError
from datasets.tissue import TISSUE_PRESETS, TissueParams
from methods.encoders import PatchEncoder, create_encoder
from methods.encoders.weights import parse_weights
from methods.precision import bf16_autocast

FEATURES_VERSION = 1
PRODUCER = "wsi-bench"


# ----------------------------------------------------------------------------- where files go


def weights_identity(weights: str | None) -> str:
    """What the cache key needs to know about --weights: a local file by its identity (path, size,
    mtime), so a replaced checkpoint gets new features."""
    spec = parse_weights(weights)
    return f"file:{slide_key(spec.path)}" if spec.kind == "path" else spec.kind


def feature_folder(cache_dir, encoder: str, weights: str | None, input_size: int | None, patch: PatchParams) -> Path:
    key = params_key({"encoder": encoder, "weights": weights_identity(weights), "input_size": input_size,
                      "patch": patch, "version": FEATURES_VERSION})
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder)
    return Path(cache_dir) / "features" / f"{safe}__{key}" / "h5_files"


# ----------------------------------------------------------------------------- reading and writing


def load_features(path) -> tuple[torch.Tensor, np.ndarray]:
    """(N, D) float32 features and (N, 2) int64 level-0 coordinates of our, CLAM's or TRIDENT's h5."""
    path = Path(path)
    if path.suffix == ".pt":
        raise ValueError(f"{path}: CLAM's .pt files hold no coordinates; use the h5 file of the same slide (CLAM's h5_files folder)")
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise ValueError(f"{path} lacks a 'features' or 'coords' dataset; expected a CLAM or TRIDENT feature file")
        features = np.asarray(f["features"][:], dtype=np.float32)
        coords = np.asarray(f["coords"][:]).astype(np.int64)
    features = features.reshape(-1, features.shape[-1])  # some tools save (1, N, D)
    coords = coords.reshape(-1, 2)
    if len(features) != len(coords):
        raise ValueError(f"{path}: {len(features)} feature rows but {len(coords)} coordinates")
    return torch.from_numpy(features), coords


def feature_attrs(path) -> dict:
    """Root attributes plus the coords dataset's, as plain Python values."""
    with h5py.File(path, "r") as f:
        raw = {**dict(f["coords"].attrs), **dict(f.attrs)}
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in raw.items()}


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, coords_attrs: dict, root_attrs: dict) -> Path:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", data=np.asarray(features, np.float32))
        feats.attrs["name"] = root_attrs["slide_id"]
        feats.attrs["encoder"] = root_attrs["encoder"]
        dataset = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in coords_attrs.items():
            dataset.attrs[key] = value
        for key, value in root_attrs.items():
            f.attrs[key] = value
    return path


# ----------------------------------------------------------------------------- one slide's plan


@dataclass(frozen=True)
class SlideFeatureJob:
    slide_id: str
    slide_path: Path
    coords_path: Path
    out_path: Path


@dataclass
class _Planned:
    job: SlideFeatureJob
    coords: np.ndarray
    coords_attrs: dict  # raw attributes for the output's coords dataset
    read_mpp: float  # um/px at which patch_size pixels span patch_size_level0 level-0 pixels
    patch_size: int
    slide_key: str


def plan_slide(job: SlideFeatureJob, encoder_name: str, default_mpp: float | None) -> _Planned | None:
    """Read the grid; None when the job's output is already done (told from the files alone, so that a
    rerun over cached features opens no slide); else open the slide once (it must open, and gives the
    level-0 facts CLAM's coords lack)."""
    coords, norm = read_coords(job.coords_path)
    if is_done(job, coords, encoder_name):
        return None
    with h5py.File(job.coords_path, "r") as f:
        raw = dict(f["coords"].attrs)
    with WSI.open(job.slide_path, default_mpp) as wsi:
        width, height = wsi.dimensions
        mpp, magnification = wsi.mpp, wsi.magnification
    attrs = {
        **raw,
        "patch_size": norm["patch_size"],
        "patch_size_level0": norm["patch_size_level0"],
        "patch_level": raw.get("patch_level", 0),
        "level0_magnification": norm["level0_magnification"] or magnification,
        "target_magnification": norm["target_magnification"] or magnification * norm["patch_size"] / norm["patch_size_level0"],
        "level0_width": norm.get("level0_width", width),
        "level0_height": norm.get("level0_height", height),
        "level0_mpp": mpp,
        "name": job.slide_id,
    }
    read_mpp = mpp * norm["patch_size_level0"] / norm["patch_size"]
    return _Planned(job, coords, attrs, read_mpp, norm["patch_size"], slide_key(job.slide_path))


def is_done(job: SlideFeatureJob, coords: np.ndarray, encoder_name: str) -> bool:
    """An existing file counts only if it is of this slide file (its key: path, size, mtime), this grid
    and this encoder."""
    if not job.out_path.is_file():
        return False
    try:
        with h5py.File(job.out_path, "r") as f:
            same = (f.attrs.get("slide_key") == slide_key(job.slide_path) and f.attrs.get("encoder") == encoder_name
                    and f["features"].shape[0] == len(coords) and np.array_equal(f["coords"][:], coords))
    except (OSError, KeyError):  # unreadable leftovers are rebuilt; a vanished slide fails when planned
        return False
    return bool(same)


# ----------------------------------------------------------------------------- reading patches


class PatchDataset(Dataset):
    """All patches of several slides, slide after slide. Item: (index, (S, S, 3) uint8, error).

    A patch that fails to decode yields an error string (and a blank patch) instead of killing the
    DataLoader, so one corrupt slide is reported and the others go on."""

    MAX_OPEN = 4  # slide handles kept open per worker

    def __init__(self, planned: list[_Planned], default_mpp: float | None):
        self.planned, self.default_mpp = planned, default_mpp
        self.offsets = np.cumsum([0] + [len(p.coords) for p in planned]).tolist()
        self._open: OrderedDict[int, WSI] = OrderedDict()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        slide = bisect.bisect_right(self.offsets, index) - 1
        return slide, index - self.offsets[slide]

    def _wsi(self, slide: int) -> WSI:
        if slide not in self._open:
            if len(self._open) >= self.MAX_OPEN:
                self._open.popitem(last=False)[1].close()
            self._open[slide] = WSI.open(self.planned[slide].job.slide_path, self.default_mpp)
        self._open.move_to_end(slide)
        return self._open[slide]

    def __getitem__(self, index: int):
        slide, row = self.locate(index)
        plan = self.planned[slide]
        x, y = plan.coords[row]
        try:
            patch = self._wsi(slide).read(int(x), int(y), plan.patch_size, plan.read_mpp)
            return index, torch.from_numpy(patch), ""
        except SlideError as err:
            return index, torch.full((plan.patch_size, plan.patch_size, 3), 255, dtype=torch.uint8), err.reason


def collate(items):
    """Patches of one batch can differ in size across slides (other grids): keep them as a list then."""
    indices, patches, errors = zip(*items)
    same = all(p.shape == patches[0].shape for p in patches)
    return torch.tensor(indices), torch.stack(patches) if same else list(patches), list(errors)


# ----------------------------------------------------------------------------- extraction


@dataclass
class ExtractionReport:
    done: dict[str, Path] = field(default_factory=dict)  # slide_id -> h5 (new or already there)
    failed: dict[str, str] = field(default_factory=dict)  # slide_id -> reason
    skipped: list[str] = field(default_factory=list)  # already extracted
    patches: int = 0  # patches encoded by this call
    seconds: float = 0.0  # wall time of reading + encoding + writing

    @property
    def patches_per_second(self) -> float:
        return self.patches / self.seconds if self.seconds else 0.0


@torch.no_grad()
def encode(encoder: PatchEncoder, patches, device: str) -> np.ndarray:
    cuda = device.startswith("cuda")
    batches = [patches] if isinstance(patches, torch.Tensor) else [p.unsqueeze(0) for p in patches]
    outputs = []
    for batch in batches:
        x = encoder.preprocess(batch.to(device, non_blocking=True))
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with bf16_autocast(device):
            outputs.append(encoder(x).float().cpu())
    return torch.cat(outputs).numpy()


def extract_features(jobs: list[SlideFeatureJob], encoder: PatchEncoder | Callable[[], PatchEncoder], *,
                     encoder_name: str | None = None, device: str = "cpu", batch_size: int = 128, num_workers: int = 0,
                     default_mpp: float | None = None, progress: bool = True) -> ExtractionReport:
    """Encode every patch of every job's slide and write one h5 per slide (skipping valid existing ones).

    `encoder` may be a function that builds it (with `encoder_name`): then it is built, and its weights
    fetched, only when some slide still needs features."""
    encoder_name = encoder.name if isinstance(encoder, PatchEncoder) else encoder_name
    if encoder_name is None:
        raise ValueError("extract_features needs encoder_name when given an encoder factory")
    report = ExtractionReport()
    todo: list[_Planned] = []
    for job in jobs:
        try:
            planned = plan_slide(job, encoder_name, default_mpp)
        except (SlideError, ValueError, FileNotFoundError, OSError) as err:
            report.failed[job.slide_id] = err.reason if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
            continue
        if planned is None:
            report.done[job.slide_id] = job.out_path
            report.skipped.append(job.slide_id)
        elif len(planned.coords) == 0:
            report.failed[job.slide_id] = "the patch grid is empty"
        else:
            todo.append(planned)
    if not todo:
        return report
    encoder = prepare_encoder(encoder if isinstance(encoder, PatchEncoder) else encoder(), device)
    root = {"producer": PRODUCER, "version": FEATURES_VERSION, **encoder_attrs(encoder)}
    start = time.perf_counter()
    run_extraction(todo, encoder, root, report, device, batch_size, num_workers, default_mpp, progress)
    report.seconds = time.perf_counter() - start
    return report


def prepare_encoder(encoder: PatchEncoder, device: str) -> PatchEncoder:
    encoder = encoder.eval().to(device)
    return encoder.to(memory_format=torch.channels_last) if device.startswith("cuda") else encoder


def encoder_attrs(encoder: PatchEncoder) -> dict:
    return {"encoder": encoder.name, "encoder_weights": encoder.weights, "embed_dim": encoder.embed_dim,
            "preprocessing": json.dumps(encoder.preprocess.describe(), sort_keys=True)}


def run_extraction(todo, encoder, root, report, device, batch_size, num_workers, default_mpp, progress) -> None:
    dataset = PatchDataset(todo, default_mpp)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                        pin_memory=device.startswith("cuda"), persistent_workers=False,
                        prefetch_factor=4 if num_workers else None)
    buffers: dict[int, np.ndarray] = {}
    remaining = [len(p.coords) for p in todo]
    errors: dict[int, str] = {}
    bar = tqdm(total=len(dataset), desc=f"features {encoder.name}", unit="patch", disable=not progress, dynamic_ncols=True)
    with bar:
        for indices, patches, batch_errors in loader:
            features = encode(encoder, patches, device)
            for index, feature, error in zip(indices.tolist(), features, batch_errors):
                slide, row = dataset.locate(index)
                if error:
                    errors.setdefault(slide, error)
                buffer = buffers.setdefault(slide, np.empty((len(todo[slide].coords), encoder.embed_dim), np.float32))
                buffer[row] = feature
                remaining[slide] -= 1
                if remaining[slide] == 0:
                    finish_slide(todo[slide], buffers.pop(slide), errors.get(slide), root, report)
            report.patches += len(indices)
            bar.update(len(indices))


def finish_slide(plan: _Planned, features: np.ndarray, error: str | None, root: dict, report: ExtractionReport) -> None:
    slide_id = plan.job.slide_id
    if error:
        report.failed[slide_id] = error
        return
    attrs = {**root, "slide_id": slide_id, "slide_key": plan.slide_key, "slide_path": str(plan.job.slide_path)}
    report.done[slide_id] = write_features(plan.job.out_path, features, plan.coords, plan.coords_attrs, attrs)


# ----------------------------------------------------------------------------- command line


def slide_table(paths: list[Path]) -> pd.DataFrame:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SLIDE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no slide file or folder at {path}")
    if not files:
        raise FileNotFoundError(f"no slide files ({', '.join(SLIDE_EXTENSIONS)}) under {', '.join(map(str, paths))}")
    return pd.DataFrame({"slide_id": [p.stem for p in files], "path": [str(p.absolute()) for p in files]})


def shard(table: pd.DataFrame, spec: str | None) -> pd.DataFrame:
    """'i/n': every n-th slide starting at i (one process per GPU: CUDA_VISIBLE_DEVICES=i ... --shard i/n)."""
    if not spec:
        return table
    try:
        index, count = (int(v) for v in spec.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise ValueError(f"--shard takes i/n with 0 <= i < n, got '{spec}'") from None
    return table.iloc[index::count]


def extract_slides(table: pd.DataFrame, cache_dir: Path, encoder_name: str, *, weights: str | None = "hub",
                   input_size: int | None = None, patch: PatchParams = PatchParams(), device: str = "cpu",
                   batch_size: int = 128, num_workers: int = 0, default_mpp: float | None = None,
                   tissue: TissueParams = TissueParams(), progress: bool = True, strict: bool = False,
                   features_root: Path | None = None, encoder: PatchEncoder | None = None,
                   quarantine=None) -> ExtractionReport:
    """Slide stage (tissue, patch grid; cached) then features, for a table with slide_id and path.
    The encoder is built (weights fetched) only if some slide still needs features."""
    from datasets.preprocess import preprocess_slides

    products = preprocess_slides(table, cache_dir, products=("tissue", "patches"), patch=patch, tissue=tissue,
                                 workers=num_workers, default_mpp=default_mpp, strict=strict, progress=progress,
                                 quarantine=quarantine)
    folder = features_root or feature_folder(cache_dir, encoder_name, weights, input_size, patch)
    paths = dict(zip(table["slide_id"].astype(str), table["path"]))
    jobs = [SlideFeatureJob(sid, Path(paths[sid]), prod.patches, folder / f"{sid}.h5") for sid, prod in products.items()]
    build = encoder or (lambda: create_encoder(encoder_name, weights=weights, input_size=input_size))
    report = extract_features(jobs, build, encoder_name=encoder_name, device=device, batch_size=batch_size,
                              num_workers=num_workers, default_mpp=default_mpp, progress=progress)
    if quarantine is not None:
        record_feature_failures(quarantine, report, list(products))
    if strict and report.failed:
        slide_id, reason = next(iter(report.failed.items()))
        raise RuntimeError(f"features of slide {slide_id} failed (--strict): {reason}")
    for slide_id in set(paths) - set(products):
        report.failed.setdefault(slide_id, "slide stage failed (see the quarantine file)")
    return report


def record_feature_failures(quarantine, report: ExtractionReport, slide_ids: list[str]) -> None:
    """Stage 'features' in the cohort's quarantine file: added for failures, taken off for successes."""
    for slide_id in slide_ids:
        if slide_id in report.failed:
            quarantine.add(slide_id, "features", report.failed[slide_id])
        else:
            quarantine.discard(slide_id, ("features",))
    quarantine.write()


def benchmark(table: pd.DataFrame, encoder_name: str, *, weights: str | None = "random", input_size: int | None = None,
              patch: PatchParams = PatchParams(), tissue: TissueParams = TissueParams(), device: str = "cuda",
              batch_size: int = 256, num_workers: int = 8, default_mpp: float | None = None,
              cache_dir: Path | None = None) -> dict:
    """Patches per second from slide files to features (reading, decoding, preprocessing, encoding, writing).

    Patch grids are made first and not timed; the encoder is built and moved to the device first and
    not timed; features go to a fresh temporary folder so nothing is skipped."""
    encoder = create_encoder(encoder_name, weights=weights, input_size=input_size)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(cache_dir) if cache_dir else Path(tmp) / "cache"
        report = extract_slides(table, cache, encoder_name, weights=weights, input_size=input_size, patch=patch,
                                tissue=tissue, device=device, batch_size=batch_size, num_workers=num_workers,
                                default_mpp=default_mpp, progress=False, features_root=Path(tmp) / "features",
                                encoder=encoder)
    return {"encoder": encoder_name, "input_size": encoder.preprocess.input_size, "patch_size": patch.patch_size,
            "magnification": patch.magnification, "device": device_name(device), "batch_size": batch_size,
            "workers": num_workers, "slides": len(report.done), "failed": len(report.failed),
            "patches": report.patches, "seconds": round(report.seconds, 3),
            "patches_per_s": round(report.patches_per_second, 1)}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m methods.features", description=__doc__.split("\n\n")[0])
    parser.add_argument("slides", nargs="+", type=Path, help="slide files or folders (searched recursively)")
    parser.add_argument("--cache-dir", type=Path, help="where patch grids and features go (required unless --bench)")
    parser.add_argument("--encoder", default="resnet50_trunc", help="resnet50_trunc | conch_v1 | timm:<model>")
    parser.add_argument("--weights", default=None, help="hub | PATH | random (default: hub; --bench: random)")
    parser.add_argument("--input-size", type=int, default=None, help="encoder input size (default: the encoder's)")
    parser.add_argument("--magnification", type=float, default=20)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader / slide-stage worker processes")
    parser.add_argument("--default-mpp", type=float, default=None)
    parser.add_argument("--tissue-preset", default="default", choices=sorted(TISSUE_PRESETS), help="tissue segmentation preset")
    parser.add_argument("--shard", default=None, help="i/n: only every n-th slide from the i-th (one process per GPU)")
    parser.add_argument("--bench", action="store_true", help="time extraction into a temporary folder; print JSON")
    args = parser.parse_args(argv)
    try:
        table = shard(slide_table(args.slides), args.shard)
        patch = PatchParams(magnification=args.magnification, patch_size=args.patch_size)
        common = dict(input_size=args.input_size, patch=patch, tissue=TISSUE_PRESETS[args.tissue_preset], device=args.device, batch_size=args.batch_size,
                      num_workers=args.workers, default_mpp=args.default_mpp)
        if args.bench:
            print(json.dumps(benchmark(table, args.encoder, weights=args.weights or "random", cache_dir=args.cache_dir, **common)))
            return 0
        if args.cache_dir is None:
            parser.error("--cache-dir is required (or use --bench)")
        report = extract_slides(table, args.cache_dir, args.encoder, weights=args.weights or "hub", **common)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = next(iter(report.done.values())).parent if report.done else None
    print(f"{len(report.done)} slides with features ({len(report.skipped)} already there) in {folder}; "
          f"{report.patches} patches at {report.patches_per_second:.1f} patches/s")
    for slide_id, reason in sorted(report.failed.items()):
        print(f"failed: {slide_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
