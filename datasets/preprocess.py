"""Build the cached slide products of a set of slides, in parallel, quarantining the slides that fail.

Products live under <cache_dir>/slides/<slide_key>/, named by the key of the parameters that made them:
    slide.json                 what the slide is (path, size, MPP and its source, levels)
    tissue-<key>.h5            tissue contours (datasets.tissue.Tissue)
    thumbnail-<key>.png        the segmentation image with tissue outlines, for quality control
    patches-<key>.h5           patch coordinates, CLAM + TRIDENT attributes (datasets.patches)
    lowres-<key>/              the 2.5x tissue image (datasets.lowres.TissueImage)
A product that exists is complete (atomic writes), so a rerun only builds what is missing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import pandas as pd
from tqdm import tqdm

from datasets.cache import atomic_path, params_key, slide_key
from datasets.cohorts.discovery import SLIDE_EXTENSIONS
from datasets.lowres import LowresParams, build_tissue_image, write_tissue_image
from datasets.patches import PatchParams, grid_for_slide, write_coords
from datasets.quarantine import Quarantine
from datasets.slides import WSI, SlideError
from datasets.tissue import TISSUE_PRESETS, Tissue, TissueParams, segment_tissue, write_thumbnail

PRODUCTS = ("tissue", "patches", "lowres")
STAGES = ("open", *PRODUCTS)  # in the order a slide goes through them
# Bump when the algorithm behind a product changes, so cached products made by the old one are not reused.
PRODUCT_VERSION = 1


@dataclass
class SlideProducts:
    slide_id: str
    tissue: Path | None = None
    patches: Path | None = None
    lowres: Path | None = None
    thumbnail: Path | None = None


@dataclass(frozen=True)
class _Job:
    slide_id: str
    path: str
    cache_dir: Path
    products: tuple[str, ...]
    patch: PatchParams
    tissue: TissueParams
    lowres: LowresParams
    default_mpp: float | None
    strict: bool


@dataclass
class _Result:
    slide_id: str
    products: SlideProducts | None = None
    stage: str = ""
    reason: str = ""
    built: list[str] = field(default_factory=list)  # the products this call had to make


def slide_folder(cache_dir, path) -> Path:
    return Path(cache_dir) / "slides" / slide_key(path)


def planned_products(job: _Job) -> SlideProducts:
    """Where each requested product of the slide lives (whether or not it exists yet)."""
    folder = slide_folder(job.cache_dir, job.path)
    common = {"version": PRODUCT_VERSION, "default_mpp": job.default_mpp, "tissue": job.tissue}
    tissue_key = params_key(common)
    planned = SlideProducts(job.slide_id, tissue=folder / f"tissue-{tissue_key}.h5",
                            thumbnail=folder / f"thumbnail-{tissue_key}.png")
    if "patches" in job.products:
        planned.patches = folder / f"patches-{params_key({**common, 'patch': job.patch})}.h5"
    if "lowres" in job.products:
        planned.lowres = folder / f"lowres-{params_key({**common, 'lowres': job.lowres})}"
    return planned


def _missing(planned: SlideProducts) -> list[str]:
    return [name for name in ("tissue", "thumbnail", "patches", "lowres")
            if getattr(planned, name) is not None and not getattr(planned, name).exists()]


def _write_slide_info(wsi: WSI, folder: Path) -> None:
    info_path = folder / "slide.json"
    if info_path.exists():
        return
    stat = wsi.path.stat()
    info = {"path": str(wsi.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "mpp": wsi.mpp,
            "mpp_source": wsi.mpp_source, "dimensions": list(wsi.dimensions),
            "level_downsamples": list(wsi.level_downsamples), "vendor": wsi.properties.get("openslide.vendor")}
    with atomic_path(info_path) as tmp:
        tmp.write_text(json.dumps(info, indent=1))


def _build(job: _Job, planned: SlideProducts, missing: list[str], result: _Result) -> None:
    """Open the slide and make the missing products; `result.stage` follows along for error reports."""
    result.stage = "open"
    with WSI.open(job.path, job.default_mpp) as wsi:
        _write_slide_info(wsi, planned.tissue.parent)
        result.stage = "tissue"
        if "tissue" in missing or "thumbnail" in missing:
            tissue, seg_image = segment_tissue(wsi, job.tissue)
            tissue.save(planned.tissue)
            write_thumbnail(seg_image, tissue, planned.thumbnail)
            result.built += ["tissue", "thumbnail"]
        else:
            tissue = Tissue.load(planned.tissue)
        if "patches" in missing:
            result.stage = "patches"
            coords, attrs = grid_for_slide(wsi, tissue, job.patch)
            write_coords(planned.patches, coords, attrs)
            result.built.append("patches")
        if "lowres" in missing:
            result.stage = "lowres"
            write_tissue_image(build_tissue_image(wsi, tissue, job.lowres), planned.lowres)
            result.built.append("lowres")


def process_slide(job: _Job) -> _Result:
    """Make whatever products of one slide are missing. Errors become a (stage, reason) unless strict."""
    result = _Result(job.slide_id, stage="open")
    try:
        planned = planned_products(job)
        missing = _missing(planned)
        if missing:
            _build(job, planned, missing, result)
    except Exception as err:  # one bad slide must not stop the others; strict runs want the traceback
        if job.strict:
            raise
        result.reason = err.reason if isinstance(err, SlideError) else f"{type(err).__name__}: {err}"
        return result
    result.products, result.stage = planned, ""
    return result


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one slide per process already fills the cores


def _jobs(slides: pd.DataFrame, **common) -> list[_Job]:
    missing_columns = {"slide_id", "path"} - set(slides.columns)
    if missing_columns:
        raise ValueError(f"slides table lacks columns {sorted(missing_columns)}; it needs slide_id and path")
    duplicated = slides["slide_id"][slides["slide_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"slide ids must be unique; repeated: {duplicated[:5]}")
    return [_Job(str(row.slide_id), str(row.path), **common) for row in slides.itertuples(index=False)]


def _cached_products(job: _Job) -> SlideProducts | None:
    """The job's products if all of them are cached, else None."""
    try:
        planned = planned_products(job)
    except Exception:  # an unreadable path: let process_slide report it
        return None
    return None if _missing(planned) else planned


def _run(jobs: list[_Job], workers: int, progress: bool):
    """Yield each job's result as it completes, in worker processes when workers > 0.

    Slides whose products are all cached are answered here: starting worker processes (each imports
    the suite) would cost more than the whole cached pass."""
    bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress, dynamic_ncols=True)
    with bar:
        cached = [_cached_products(job) for job in jobs]
        for job, products in zip(jobs, cached):
            if products is not None:
                yield _Result(job.slide_id, products=products)  # what process_slide gives a cached slide
                bar.update()
        jobs = [job for job, products in zip(jobs, cached) if products is None]
        if workers <= 0 or not jobs:
            for job in jobs:
                yield process_slide(job)
                bar.update()
            return
        # spawn: workers start clean, without the parent's threads (torch, OpenCV) that fork would copy
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
            futures = [pool.submit(process_slide, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def preprocess_slides(
    slides: pd.DataFrame,
    cache_dir: Path,
    *,
    products=("tissue", "patches"),
    patch: PatchParams = PatchParams(),
    tissue: TissueParams = TissueParams(),
    lowres: LowresParams = LowresParams(),
    workers: int = 0,
    default_mpp: float | None = None,
    strict: bool = False,
    progress: bool = True,
    quarantine: Quarantine | None = None,
) -> dict[str, SlideProducts]:
    """Build (or find in the cache) the requested products of every slide (columns slide_id, path).

    Returns the products of the slides that succeeded, in the table's order. A slide that fails is
    recorded in `quarantine` (slide_id, stage, reason) and the others go on; strict=True raises the
    first failure instead. The tissue product and its thumbnail are always made.
    """
    unknown = set(products) - set(PRODUCTS)
    if unknown:
        raise ValueError(f"unknown products {sorted(unknown)}; choose from {PRODUCTS}")
    jobs = _jobs(slides, cache_dir=Path(cache_dir), products=tuple(products), patch=patch, tissue=tissue,
                 lowres=lowres, default_mpp=default_mpp, strict=strict)
    quarantine = quarantine if quarantine is not None else Quarantine(None)
    done: dict[str, SlideProducts] = {}
    try:
        for result in _run(jobs, workers, progress):
            if result.products is None:
                quarantine.discard(result.slide_id, STAGES[: STAGES.index(result.stage)])  # passed those now
                quarantine.add(result.slide_id, result.stage, result.reason)
            else:
                done[result.slide_id] = result.products
                quarantine.discard(result.slide_id, ("open", "tissue", *products))
    finally:
        quarantine.write()
    return {job.slide_id: done[job.slide_id] for job in jobs if job.slide_id in done}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasets.preprocess",
                                     description="Tissue masks, patch grids and 2.5x tissue images of a folder of slides.")
    parser.add_argument("slides", type=Path, help="folder of slides (searched recursively) or a CSV with slide_id,path")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--products", nargs="+", default=["tissue", "patches"], choices=PRODUCTS)
    parser.add_argument("--preset", default="default", choices=sorted(TISSUE_PRESETS))
    parser.add_argument("--magnification", type=float, default=PatchParams.magnification)
    parser.add_argument("--patch-size", type=int, default=PatchParams.patch_size)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--default-mpp", type=float, default=None, help="um/px for slides whose metadata has none")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad slide")
    parser.add_argument("--quarantine", type=Path, default=None, help="CSV of bad slides (default: <cache-dir>/quarantine.csv)")
    parser.add_argument("--extensions", nargs="+", default=list(SLIDE_EXTENSIONS))
    args = parser.parse_args(argv)
    if args.slides.is_dir():
        paths = sorted(p for p in args.slides.rglob("*") if p.suffix.lower() in args.extensions)
        table = pd.DataFrame({"slide_id": [p.stem for p in paths], "path": [str(p) for p in paths]})
    elif args.slides.is_file():
        table = pd.read_csv(args.slides)
    else:
        parser.error(f"{args.slides} is neither a folder of slides nor a CSV file")
    quarantine = Quarantine(args.quarantine or args.cache_dir / "quarantine.csv")
    done = preprocess_slides(table, args.cache_dir, products=tuple(args.products),
                             patch=PatchParams(args.magnification, args.patch_size),
                             tissue=TISSUE_PRESETS[args.preset], workers=args.workers,
                             default_mpp=args.default_mpp, strict=args.strict, quarantine=quarantine)
    print(f"{len(done)} of {len(table)} slides ready in {args.cache_dir}; "
          f"{len(quarantine)} quarantined (see {quarantine.path})")
    for record in quarantine.records:
        print(f"  {record['slide_id']}: {record['stage']}: {record['reason']}")


if __name__ == "__main__":
    main()
