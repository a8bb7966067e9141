"""The job plan: one job = (method, dataset, task, fold, seed), each with a resolved config and its hash."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from benchmark.results import read_result, result_path
from datasets.cohorts.base import Cohort, Fold, Task


@dataclass(frozen=True)
class Job:
    method: str
    dataset: str
    task: str
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}/{self.task}/fold{self.fold}/seed{self.seed}"


@dataclass
class PlannedJob:
    job: Job
    config: dict
    config_hash: str
    path: Path
    done: bool  # a result with the same config hash already exists


def ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_config(job: Job, method_config: dict, cohort: Cohort, fold: Fold, n_folds: int,
               max_epochs: int | None, weights: str | None, task_kind: str = "classification") -> dict:
    """Everything that decides a job's result: a change to any of it reruns the job."""
    return {
        "method": job.method,
        "method_config": method_config,
        "dataset": job.dataset,
        "task": job.task,
        "task_kind": task_kind,
        "fold": job.fold,
        "seed": job.seed,
        "n_folds": n_folds,
        "split": {"source": fold.source, **{part: ids_digest(ids) for part, ids in fold.partitions().items()}},
        "slides": ids_digest(cohort.slides["slide_id"]),
        "max_epochs": max_epochs,
        "weights": weights,
    }


def plan(methods: dict, cohort: Cohort, task: Task, folds: list[Fold], seeds: list[int], out_dir: Path,
         max_epochs: int | None, weights: str | None) -> list[PlannedJob]:
    """methods: name -> built Method. A job is done when its result file is 'ok' with the same hash."""
    planned = []
    for name, method in methods.items():
        method_config = method.config()
        for fold in folds:
            for seed in seeds:
                job = Job(name, cohort.name, task.name, fold.index, seed)
                planned.append(plan_job(job, method_config, cohort, task, fold, len(folds), out_dir,
                                        max_epochs, weights))
    return planned


def plan_job(job: Job, method_config: dict, cohort: Cohort, task: Task, fold: Fold, n_folds: int,
             out_dir: Path, max_epochs: int | None, weights: str | None) -> PlannedJob:
    """One job's config, hash, result file and whether that file already holds it; reads no other file."""
    config = job_config(job, method_config, cohort, fold, n_folds, max_epochs, weights, task.kind)
    digest = config_hash(config)
    path = result_path(out_dir, job.dataset, job.task, job.method, job.fold, job.seed)
    return PlannedJob(job, config, digest, path, _is_done(path, digest))


def _is_done(path: Path, digest: str) -> bool:
    if not path.exists():
        return False
    record = read_result(path)
    return record.get("status") == "ok" and record.get("config_hash") == digest
