"""Running a benchmark: build the cohort and methods, plan jobs, prepare slide products, run each job,
write one result file per job, rebuild the leaderboards."""
from __future__ import annotations

import importlib
import inspect
import random
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmark import leaderboard, provenance
from benchmark.api import FoldOutput, Method, RunContext
from benchmark.jobs import PlannedJob, plan
from benchmark.metrics import compute_metrics
from benchmark.registry import DATASETS, METHODS, load_all
from benchmark.results import atomic_write_text
from datasets.cohorts.base import Cohort, Fold, Task
from datasets.splits import write_split_dir


@dataclass
class RunOptions:
    methods: list[str]
    dataset: str
    task: str | None = None
    n_folds: int = 5
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: Path = Path("runs")
    cache_dir: Path | None = None
    data_root: Path | None = None
    leaderboard_dir: Path = Path("leaderboards")
    max_epochs: int | None = None
    weights: str | None = None
    splits: str = "default"
    split_seed: int = 0
    strict: bool = False
    default_mpp: float | None = None
    workers: int = 0
    device: str = "cpu"
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    progress: bool = True
    plugins: list[str] = field(default_factory=list)  # modules imported to register extra methods/datasets
    # how jobs run (benchmark/launchers; docs/scheduling.md)
    launcher: str = "local"  # "local" | "slurm"
    gpus: list[int] = field(default_factory=list)  # local: GPU ids, one job process per GPU; empty: CPU
    cpu_jobs: int = 0  # local on the CPU: 0 = jobs one after another in this process; N = N job processes
    gpus_per_job: int | None = None  # None: each method's own `gpus_per_job` (default 1)
    retry_oom: bool = False  # retry an out-of-memory job once with the method's memory-saving settings
    partition: str | None = None  # slurm
    time: str | None = None  # slurm time limit per job, sbatch syntax (e.g. "4:00:00")
    account: str | None = None  # slurm
    sbatch_flags: list[str] = field(default_factory=list)  # slurm: extra "KEY=VALUE" sbatch options


@dataclass
class RunSummary:
    planned: list[PlannedJob]
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    leaderboards: list[Path] = field(default_factory=list)


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("wsi-bench"))


def seed_everything(seed: int) -> None:
    """Same seed, same CPU result: every job starts from the same random state whatever ran before."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_cohort(opts: RunOptions) -> Cohort:
    kwargs = dict(data_root=opts.data_root, cache_dir=opts.cache_dir or default_cache_dir(), seed=opts.split_seed,
                  splits=opts.splits)
    # a cohort that makes its data on first use (the synthetic one) shows a progress bar unless told not to
    if "progress" in inspect.signature(DATASETS.get(opts.dataset).obj).parameters:
        kwargs["progress"] = opts.progress
    return DATASETS.create(opts.dataset, **kwargs)


def build_methods(opts: RunOptions) -> dict[str, Method]:
    kwargs = dict(opts.overrides)
    if opts.preset:
        kwargs["preset"] = opts.preset
    return {name: METHODS.create(name, **kwargs) for name in opts.methods}


def context(opts: RunOptions, job_dir: Path | None = None) -> RunContext:
    return RunContext(out_dir=Path(opts.out_dir), cache_dir=Path(opts.cache_dir or default_cache_dir()),
                      device=opts.device, max_epochs=opts.max_epochs, num_workers=opts.workers,
                      strict=opts.strict, progress=opts.progress, job_dir=job_dir, weights=opts.weights,
                      default_mpp=opts.default_mpp)


def job_dir(opts: RunOptions, planned: PlannedJob) -> Path:
    j = planned.job
    return Path(opts.out_dir) / "work" / j.dataset / j.task / j.method / f"fold{j.fold}_seed{j.seed}"


def check_predictions(out: FoldOutput, task: Task, fold: Fold) -> pd.DataFrame:
    """The method must score every patient of the reported partition exactly once."""
    preds = out.predictions
    needed = {"patient_id", "partition", *task.label_columns}
    needed |= {"risk"} if task.kind == "survival" else {f"prob_{k}" for k in range(task.n_classes)}
    missing = needed - set(preds.columns)
    if missing:
        raise ValueError(f"predictions lack columns {sorted(missing)}")
    reported = preds[preds["partition"] == fold.reported]
    expected = set(getattr(fold, fold.reported)) - set(out.info.get("patients_without_slides", []))
    if reported["patient_id"].duplicated().any() or set(reported["patient_id"]) != expected:
        raise ValueError(f"predictions for partition '{fold.reported}' do not cover its {len(expected)} patients once each")
    return preds


def execute_job(planned: PlannedJob, method: Method, cohort: Cohort, task: Task, fold: Fold,
                ctx: RunContext) -> dict:
    """Run one job and return its result record (status 'ok' or 'failed'; never raises for job errors)."""
    started = time.perf_counter()
    base = {"job": planned.job.__dict__, "config": planned.config, "config_hash": planned.config_hash,
            "versions": provenance.package_versions(), "git_commit": provenance.git_commit(),
            "device": provenance.device_description(ctx.device)}
    try:
        seed_everything(planned.job.seed)
        reset_peak_memory(ctx.device)
        out = method.run_fold(cohort, task, fold, planned.job.seed, ctx)
        preds = check_predictions(out, task, fold)
        metrics = {part: compute_metrics(task.kind, preds[preds["partition"] == part])
                   for part in sorted(preds["partition"].unique())}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a failed job is recorded and the run goes on
        return {**base, "status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(), "timings": {"total_s": time.perf_counter() - started},
                "finished_at": datetime.now(timezone.utc).isoformat()}
    return {
        **base,
        "status": "ok",
        "reported_partition": fold.reported,
        "metrics": metrics[fold.reported],
        "metrics_by_partition": metrics,
        "predictions": preds.to_dict("records"),
        "n_patients": {part: len(ids) for part, ids in fold.partitions().items()},
        "n_slides": {part: int(cohort.slides["patient_id"].isin(ids).sum()) for part, ids in fold.partitions().items()},
        "missing_slides": sorted(out.missing_slides),
        "weights": out.weights,
        "info": out.info,
        "protocol": cohort.protocol,
        "timings": {"total_s": time.perf_counter() - started, **out.info.get("timings", {})},
        "cost": cost(out.info.get("timings", {}), ctx.device),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def cost(timings: dict, device: str) -> dict:
    """What a job cost: seconds per slide for training and inference (methods report train_s,
    n_train_slides = slides seen over all epochs, infer_s, n_infer_slides in info['timings']) and peak memory."""
    import resource

    per_slide = {}
    for stage in ("train", "infer"):
        seconds, slides = timings.get(f"{stage}_s"), timings.get(f"n_{stage}_slides")
        if seconds is not None and slides:
            per_slide[f"{stage}_s_per_slide"] = seconds / slides
    if device.startswith("cuda"):
        peak = {"peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    else:  # ru_maxrss is in KiB on Linux: the process's peak, an upper bound for this job
        peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"device": "gpu" if device.startswith("cuda") else "cpu", **per_slide, **peak}


def write_run_provenance(opts: RunOptions, argv: list[str] | None, state: RunState) -> None:
    """<out>/provenance/run_<time>_<pid>.json: how this run was made (two runners never share a file)."""
    import json
    import os

    record = {"argv": argv, "options": opts.__dict__,  # Paths become strings through default=str below
              "method_configs": {name: m.config() for name, m in state.methods.items()},
              "jobs_planned": len(state.planned),
              "versions": provenance.package_versions(), "git_commit": provenance.git_commit(),
              "hardware": {**provenance.hardware(), "cuda": torch.version.cuda},
              "environment": {k: v for k, v in os.environ.items()
                              if k == "CUDA_VISIBLE_DEVICES" or k.startswith(("SLURM_JOB", "SLURM_CLUSTER"))},
              "started_at": datetime.now(timezone.utc).isoformat()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    atomic_write_text(Path(opts.out_dir) / "provenance" / f"run_{stamp}_{os.getpid()}.json",
                      json.dumps(record, indent=1, default=str))


@dataclass
class RunState:
    cohort: Cohort
    task: Task
    folds: list[Fold]
    methods: dict[str, Method]
    planned: list[PlannedJob]


def make_plan(opts: RunOptions) -> RunState:
    """Build the cohort, its folds (audited) and the methods, and plan the jobs. Runs nothing."""
    state = build_state(opts)
    state.planned = plan(state.methods, state.cohort, state.task, state.folds, opts.seeds, Path(opts.out_dir),
                         opts.max_epochs, opts.weights)
    return state


def build_state(opts: RunOptions) -> RunState:
    """The cohort, its folds (audited) and the methods, with no job planned: planning reads the result
    file of every job, which a process that runs one job does not need."""
    load_all()
    load_plugins(opts.plugins)
    cohort = build_cohort(opts)
    task = cohort.task(opts.task)
    folds = cohort.folds(task, opts.n_folds, opts.split_seed)
    return RunState(cohort, task, folds, build_methods(opts), [])


def load_plugins(modules: list[str]) -> None:
    """Import modules that register extra methods or datasets (`--plugin`); job processes import them too."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ValueError(f"--plugin {module}: cannot import it ({err}); give an importable module path "
                             "(run from the repository root or add its folder to PYTHONPATH)") from err


def run(opts: RunOptions, state: RunState | None = None, argv: list[str] | None = None) -> RunSummary:
    """Run every job of the plan that is not done yet (through the launcher), then rebuild the leaderboards."""
    from benchmark.launchers import launch

    state = state or make_plan(opts)
    summary = RunSummary(state.planned)
    write_run_provenance(opts, argv, state)
    leaderboard.record_plan(Path(opts.out_dir), state.planned)
    # the folds every job used, as CLAM-style CSVs: `--splits <this folder>` repeats the run exactly
    write_split_dir(state.folds, Path(opts.out_dir) / "splits" / state.cohort.name / state.task.name)
    launch(opts, state, summary)
    summary.leaderboards = leaderboard.build(Path(opts.out_dir), Path(opts.leaderboard_dir))
    return summary


def prepare(method: Method, cohort: Cohort, ctx: RunContext) -> str | None:
    """Build a method's slide products; a failure fails that method's jobs, not the run."""
    try:
        method.prepare(cohort, ctx)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if ctx.strict:
            raise
        return f"prepare failed: {type(err).__name__}: {err}"
    return None
