"""`--plugin tests.toy_plugin`: the toy cohort and toy methods, registered on import, so that job
processes (local workers, SLURM tasks) can build them too. Knobs for fault tests (none of them part
of the config hash): `sleep_s` per job, `marker_dir` (one file per execution, to count them),
`hold_dir` (a job waits while `<hold_dir>/<method>_fold<k>` exists),
`oom_on_fold` (raises CUDA out-of-memory unless `activation_checkpointing`), `gpus_per_job`.
toy_a retries an out-of-memory job with activation checkpointing; toy_b cannot and takes two GPUs;
toy_prepared has a prepare stage, toy_unpreparable one that fails."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import torch

from benchmark.registry import DATASETS, METHODS
from benchmark.results import atomic_write_text
from tests.toy import ToyMethod, toy_cohort

ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "RANK", "LOCAL_RANK")


class PluginToy(ToyMethod):
    def __init__(self, noise: float = 1.0, sleep_s: float = 0.0, marker_dir: str | None = None, hold_dir: str | None = None,
                 oom_on_fold: int | None = None, activation_checkpointing: bool = False, gpus_per_job: int = 1, **kw):
        super().__init__(noise=noise, **kw)
        self.sleep_s, self.marker_dir, self.hold_dir, self.oom_on_fold = sleep_s, marker_dir, hold_dir, oom_on_fold
        self.activation_checkpointing, self.gpus_per_job = activation_checkpointing, gpus_per_job

    def run_fold(self, cohort, task, fold, seed, ctx):
        if self.marker_dir:
            rank = os.environ.get("RANK", "0")
            name = f"{self.name}_fold{fold.index}_seed{seed}.rank{rank}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
            atomic_write_text(Path(self.marker_dir) / name,  # readers never see half a marker
                              json.dumps({"pid": os.getpid(), "slurm_job": _slurm_job()}))
        time.sleep(self.sleep_s)
        while self.hold_dir and (Path(self.hold_dir) / f"{self.name}_fold{fold.index}").exists():
            time.sleep(0.1)  # held mid-job until the test removes the file
        if fold.index == self.oom_on_fold and not self.activation_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        out = super().run_fold(cohort, task, fold, seed, ctx)
        out.info["env"] = {k: os.environ.get(k) for k in ENV_KEYS}
        out.info["activation_checkpointing"] = self.activation_checkpointing
        out.info["cuda_devices"] = torch.cuda.device_count() if ctx.device.startswith("cuda") else 0
        return out


class PreparedToy(PluginToy):
    """A method with a prepare stage: it builds a 'slide product' once into the cache (a marker per
    build), and its jobs fail if the product is not there. `fail_prepare`: the build fails."""

    def __init__(self, fail_prepare: bool = False, **kw):
        super().__init__(**kw)
        self.fail_prepare = fail_prepare

    def product(self, cohort, ctx) -> Path:
        return Path(ctx.cache_dir) / "toy_products" / f"{self.name}_{cohort.name}.ready"

    def prepare(self, cohort, ctx):
        if self.product(cohort, ctx).exists():
            return
        if self.fail_prepare:
            raise RuntimeError("slide products could not be built (simulated)")
        if self.marker_dir:
            atomic_write_text(Path(self.marker_dir) / f"prepare_{self.name}.rank0.{os.getpid()}.{uuid.uuid4().hex[:6]}",
                              json.dumps({"pid": os.getpid()}))
        atomic_write_text(self.product(cohort, ctx), "ok")

    def run_fold(self, cohort, task, fold, seed, ctx):
        if not self.product(cohort, ctx).exists():
            raise RuntimeError("the prepare stage did not run before this job")
        return super().run_fold(cohort, task, fold, seed, ctx)


def _slurm_job() -> str | None:
    """This task's SLURM id as scancel/scontrol take it: ARRAY_TASK for an array task (the bare id
    of an array's first task would name the whole array)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _method(name: str, noise: float, gpus_per_job: int, oom_retry_overrides: dict, cls=PluginToy, **fixed):
    def factory(**overrides) -> PluginToy:
        method = cls(**{"noise": noise, "gpus_per_job": gpus_per_job, **overrides, **fixed})
        method.name, method.oom_retry_overrides = name, oom_retry_overrides
        return method

    return factory


if "toy_plugin" not in DATASETS:  # imported once per process; a second import must not re-register
    DATASETS.add("toy_plugin", toy_cohort, "toy cohort (30 patients, no slides)")
    METHODS.add("toy_a", _method("toy_a", 1.0, 1, {"activation_checkpointing": True}), "toy method, noise 1")
    METHODS.add("toy_b", _method("toy_b", 3.0, 2, {}),
                "toy method, noise 3; two GPUs (ranks) per job, no memory-saving setting to retry with")
    METHODS.add("toy_prepared", _method("toy_prepared", 2.0, 1, {}, PreparedToy), "toy method with a prepare stage")
    METHODS.add("toy_unpreparable", _method("toy_unpreparable", 2.0, 1, {}, PreparedToy, fail_prepare=True),
                "toy method whose prepare stage fails")
