"""The built-in synthetic cohort: small H&E-like pyramidal TIFFs with tumour-like regions, and labels.

Every slide is drawn at 20x (0.5 um/px) from a stain model (Beer-Lambert optical densities of
hematoxylin and eosin, Ruifrok & Johnston's stain vectors), upsampled to a 40x level 0 (0.25 um/px) and
written with levels halving down to 2.5x (16x downsample). Normal tissue is pink stroma with fibres and
sparse small nuclei; tumour is denser, darker and more purple: a lighter eosin background with densely
packed large hematoxylin nuclei. The difference is in colour (visible at 2.5x) and in texture (visible
at 20x).

Labels are per patient: `stage` (0 none, 1 small, 2 large tumour burden), `metastasis` (stage > 0), and
overall survival (`time` in months, `event` 1 = death) drawn from an exponential hazard that grows with
the tumour burden, with 40% of patients censored. About a quarter of the patients have two slides; a
positive patient's tumour may be in either slide or both.

Layout of the generated folder:
    slides/<slide_id>.tiff      the slides
    annotations/<slide_id>.png  2.5x label map (0 background, 1 normal tissue, 2 tumour), for tests
    labels.csv                  slide_id, patient_id, metastasis, stage, time, event, tumor_fraction
    synthetic.json              the done-marker with the generation parameters (written last)
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from datasets.cache import atomic_path
from datasets.testing import write_pyramidal_tiff

GENERATOR_VERSION = 1
MARKER = "synthetic.json"
LEVEL0_MPP = 0.25
N_LEVELS = 5  # downsamples 1, 2, 4, 8, 16: level 4 is 2.5x

# Ruifrok & Johnston optical-density vectors (R, G, B) of hematoxylin and eosin
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], np.float32)
EOSIN = np.array([0.072, 0.990, 0.105], np.float32)
BACKGROUND_OD = 0.03  # glass is slightly grey, not pure white

TWO_SLIDE_FRACTION = 0.25
CENSORED_FRACTION = 0.4
BURDEN_RANGE = {1: (0.2, 0.3), 2: (0.5, 0.7)}  # tumour fraction of a tumour slide's tissue, by stage
BASE_HAZARD_PER_MONTH = 1 / 48
BURDEN_LOG_HAZARD = 3.0  # hazard x exp(3 * burden): a 60% burden has 6x the hazard of none


@dataclass(frozen=True)
class SlidePlan:
    slide_id: str
    patient_id: str
    index: tuple[int, int, int]  # (seed, patient, slide): the slide's own random stream
    tumor_fraction: float  # of its tissue; 0 for slides without tumour


def generate_synthetic_cohort(
    root: Path,
    seed: int = 0,
    n_patients: int = 40,
    *,
    slide_size: tuple[int, int] = (4096, 3072),
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the synthetic cohort into `root` (once: a folder with a matching done-marker is reused).

    slide_size: level-0 (width, height), multiples of 32 so that every level halves exactly.
    workers: threads drawing slides (default: up to 2); the result does not depend on it.
    Returns `root`."""
    root = Path(root)
    params = {"version": GENERATOR_VERSION, "seed": seed, "n_patients": n_patients, "slide_size": list(slide_size)}
    existing = _existing_params(root)
    if existing == params:
        return root
    if existing is not None:
        raise ValueError(
            f"{root} holds a synthetic cohort made with {existing}, not {params}; "
            "choose another --data-root or delete that folder"
        )
    if n_patients < 4:
        raise ValueError(f"n_patients must be at least 4 (two per class), got {n_patients}")
    if slide_size[0] % 32 or slide_size[1] % 32:
        raise ValueError(f"slide_size must be multiples of 32 pixels, got {slide_size}")
    plans, labels = plan_cohort(seed, n_patients)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    jobs = [(plan, root, tuple(slide_size)) for plan in plans]
    workers = workers or min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc=f"synthetic cohort (seed {seed}, once)", unit="slide", disable=not progress)
    if workers > 1:
        # threads, not processes: OpenCV, numpy and the JPEG encoder release the GIL for the heavy work,
        # and a forked child of a process that already ran torch or OpenCV threads can hang
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(_write_slide_job, jobs):
                bar.update()
    else:
        for job in jobs:
            _write_slide_job(job)
            bar.update()
    bar.close()
    _write_atomic_text(root / "labels.csv", labels.to_csv(index=False))
    _write_atomic_text(root / MARKER, json.dumps(params, indent=1))
    return root


def read_labels(root: Path) -> pd.DataFrame:
    """The per-slide labels table of a generated cohort."""
    return pd.read_csv(Path(root) / "labels.csv", dtype={"slide_id": str, "patient_id": str})


def plan_cohort(seed: int, n_patients: int) -> tuple[list[SlidePlan], pd.DataFrame]:
    """Which patient has which stage, how many slides, where the tumour is, and the survival draw."""
    rng = np.random.default_rng([seed, 0])
    n_pos = n_patients // 2
    stages = np.array([0] * (n_patients - n_pos) + [1] * (n_pos // 2) + [2] * (n_pos - n_pos // 2))
    rng.shuffle(stages)
    two_slides = _two_slide_patients(stages, rng)
    plans, rows, burdens = [], [], []
    placements = iter(["second", "first", "both"] * n_patients)  # cycle so that every placement occurs
    for p, stage in enumerate(stages):
        patient_id = f"syn{p:03d}"
        n_slides = 2 if p in two_slides else 1
        where = next(placements) if stage and n_slides == 2 else "first"
        has_tumor = [where in ("first", "both"), where in ("second", "both")][:n_slides]
        fractions = [float(rng.uniform(*BURDEN_RANGE[stage])) if stage and t else 0.0 for t in has_tumor]
        burdens.append(max(fractions))
        for k, fraction in enumerate(fractions):
            slide_id = f"{patient_id}_{k + 1}"
            plans.append(SlidePlan(slide_id, patient_id, (seed, p, k), fraction))
            rows.append({"slide_id": slide_id, "patient_id": patient_id, "metastasis": int(stage > 0),
                         "stage": int(stage), "tumor_fraction": round(fraction, 4)})
    time, event = _survival(np.array(burdens), rng)
    labels = pd.DataFrame(rows)
    by_patient = pd.DataFrame({"patient_id": [f"syn{p:03d}" for p in range(n_patients)], "time": time, "event": event})
    labels = labels.merge(by_patient, on="patient_id")
    return plans, labels[["slide_id", "patient_id", "metastasis", "stage", "time", "event", "tumor_fraction"]]


def _two_slide_patients(stages: np.ndarray, rng: np.random.Generator) -> set[int]:
    """A quarter of the patients, half of them positive, so that multi-slide positives always exist."""
    n_two = max(2, round(TWO_SLIDE_FRACTION * len(stages)))
    positives = rng.permutation(np.flatnonzero(stages > 0))
    negatives = rng.permutation(np.flatnonzero(stages == 0))
    n_pos = min(len(positives), (n_two + 1) // 2)
    return set(positives[:n_pos].tolist()) | set(negatives[: n_two - n_pos].tolist())


def _survival(burden: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exponential event times with hazard base * exp(beta * burden); exactly 40% of patients
    (rounded) are censored at a uniform fraction of their event time."""
    hazard = BASE_HAZARD_PER_MONTH * np.exp(BURDEN_LOG_HAZARD * burden)
    time = rng.exponential(1 / hazard)
    event = np.ones(len(burden), int)
    censored = rng.permutation(len(burden))[: round(CENSORED_FRACTION * len(burden))]
    event[censored] = 0
    time[censored] *= rng.uniform(0.2, 0.95, len(censored))
    return np.maximum(np.round(time, 2), 0.1), event


def _existing_params(root: Path) -> dict | None:
    marker = root / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def _write_slide_job(job: tuple[SlidePlan, Path, tuple[int, int]]) -> None:
    plan, root, slide_size = job
    annotation = write_slide(root / "slides" / f"{plan.slide_id}.tiff", plan, slide_size)
    with atomic_path(root / "annotations" / f"{plan.slide_id}.png") as tmp:
        cv2.imwrite(str(tmp), annotation)


def write_slide(path: Path, plan: SlidePlan, slide_size: tuple[int, int], *, mpp: float = LEVEL0_MPP,
                aperio: bool = False) -> np.ndarray:
    """Draw `plan`'s slide and write it to `path` (atomically): level 0 of `slide_size` (W, H) at `mpp`,
    N_LEVELS levels. aperio: an SVS-style ImageDescription (MPP, AppMag 40) instead of resolution tags,
    so that OpenSlide reads it with its Aperio driver. Returns the label map at the lowest level."""
    image20, label_map = draw_slide(plan, (slide_size[0] // 2, slide_size[1] // 2))
    level0 = cv2.resize(image20, tuple(slide_size), interpolation=cv2.INTER_LINEAR)
    with atomic_path(path) as tmp:  # two processes may generate at once
        write_pyramidal_tiff(tmp, level0, mpp, levels=N_LEVELS, aperio=aperio, app_mag=40 if aperio else None)
    small = (slide_size[0] // 2 ** (N_LEVELS - 1), slide_size[1] // 2 ** (N_LEVELS - 1))
    return cv2.resize(label_map, small, interpolation=cv2.INTER_NEAREST)


def draw_slide(plan: SlidePlan, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The slide at 20x as (H, W, 3) uint8 RGB, and its label map (0 glass, 1 normal, 2 tumour)."""
    width, height = size
    rng = np.random.default_rng(list(plan.index) + [1])
    tissue = _tissue_mask(rng, width, height)
    tumor = _tumor_mask(rng, tissue, plan.tumor_fraction)
    normal = tissue & ~tumor
    fibres = cv2.GaussianBlur(rng.standard_normal((height, width), np.float32), (0, 0), 6, sigmaY=1.2)
    fibres *= 0.12 / (fibres.std() + 1e-6)
    eosin = np.where(normal, fibres + np.float32(0.55), np.where(tumor, np.float32(0.32), np.float32(0)))
    hema = np.where(normal, np.float32(0.07), np.where(tumor, np.float32(0.30), np.float32(0)))
    nuclei = np.zeros((height, width), np.float32)
    _draw_nuclei(nuclei, normal, rng, area_per_nucleus=700, radius=(3, 5), stain=(0.8, 1.1))
    _draw_nuclei(nuclei, tumor, rng, area_per_nucleus=110, radius=(5, 8), stain=(1.2, 1.6))
    hema = np.maximum(hema, cv2.GaussianBlur(nuclei, (0, 0), 0.8))
    strength = rng.uniform(0.9, 1.1, 2).astype(np.float32)  # slide-to-slide staining variation
    grain = rng.standard_normal((2, height, width), np.float32)
    grain *= np.float32(0.03) * tissue
    hema = strength[0] * hema + grain[0]
    eosin = strength[1] * eosin + grain[1]
    # Beer-Lambert: transmitted light = exp(-optical density), per RGB channel
    od = np.stack([hema * HEMATOXYLIN[c] + eosin * EOSIN[c] for c in range(3)], axis=-1)
    od += np.float32(BACKGROUND_OD)
    np.maximum(od, 0, out=od)
    image = cv2.exp(-od) * 255
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    label_map = tissue.astype(np.uint8) + tumor.astype(np.uint8)
    return image, label_map


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid (`cells` across the long side) upsampled smoothly."""
    gw = cells if width >= height else max(2, round(cells * width / height))
    gh = cells if height > width else max(2, round(cells * height / width))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _tissue_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A few organic tissue pieces covering 30-45% of the slide, kept off the slide edges."""
    field = _smooth_field(rng, width, height, 6) + 0.35 * _smooth_field(rng, width, height, 24)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    edge = np.maximum(np.abs(xx / width - 0.5), np.abs(yy / height - 0.5))  # 0 centre, 0.5 edge
    field -= 10.0 * np.clip(edge - 0.3, 0, None)
    coverage = rng.uniform(0.30, 0.45)
    return field > np.quantile(field, 1 - coverage)


def _tumor_mask(rng: np.random.Generator, tissue: np.ndarray, fraction: float) -> np.ndarray:
    """Compact tumour blobs inside the tissue covering `fraction` of it (none for fraction 0)."""
    field = _smooth_field(rng, tissue.shape[1], tissue.shape[0], 5)
    if fraction <= 0:
        return np.zeros_like(tissue)
    threshold = np.quantile(field[tissue], 1 - fraction)
    return tissue & (field > threshold)


def _draw_nuclei(canvas, region, rng, *, area_per_nucleus: float, radius: tuple[float, float],
                 stain: tuple[float, float]) -> None:
    """Random elliptical nuclei centred in `region`, drawn into `canvas` as hematoxylin density.

    OpenCV draws each ellipse in C; the Python loop costs about a microsecond per nucleus."""
    ys, xs = np.nonzero(region)
    n = int(len(ys) / area_per_nucleus)
    if n == 0:
        return
    pick = rng.integers(0, len(ys), n)
    axes = rng.uniform(*radius, (n, 2))
    angles = rng.uniform(0, 180, n)
    values = rng.uniform(*stain, n)
    for x, y, (a, b), angle, value in zip(xs[pick], ys[pick], axes, angles, values):
        cv2.ellipse(canvas, (int(x), int(y)), (int(round(a)), int(round(b))), float(angle), 0, 360,
                    float(value), thickness=-1, lineType=cv2.LINE_AA)


def _write_atomic_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
