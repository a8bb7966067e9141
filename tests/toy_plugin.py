"""`--plugin tests.toy_plugin`: the toy cohort and two toy methods, registered on import, so that job
processes (local workers, SLURM tasks) can build them too. Knobs for fault tests (none of them part
of the config hash): `sleep_s` per job, `marker_dir` (one file per execution, to count them),
`oom_on_fold` (raises CUDA out-of-memory unless `activation_checkpointing`), `gpus_per_job`.
toy_a retries an out-of-memory job with activation checkpointing; toy_b cannot."""
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
    def __init__(self, noise: float = 1.0, sleep_s: float = 0.0, marker_dir: str | None = None,
                 oom_on_fold: int | None = None, activation_checkpointing: bool = False, gpus_per_job: int = 1, **kw):
        super().__init__(noise=noise, **kw)
        self.sleep_s, self.marker_dir, self.oom_on_fold = sleep_s, marker_dir, oom_on_fold
        self.activation_checkpointing, self.gpus_per_job = activation_checkpointing, gpus_per_job

    def run_fold(self, cohort, task, fold, seed, ctx):
        if self.marker_dir:
            rank = os.environ.get("RANK", "0")
            name = f"{self.name}_fold{fold.index}_seed{seed}.rank{rank}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
            atomic_write_text(Path(self.marker_dir) / name,  # readers never see half a marker
                              json.dumps({"pid": os.getpid(), "slurm_job": _slurm_job()}))
        time.sleep(self.sleep_s)
        if fold.index == self.oom_on_fold and not self.activation_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        out = super().run_fold(cohort, task, fold, seed, ctx)
        out.info["env"] = {k: os.environ.get(k) for k in ENV_KEYS}
        out.info["activation_checkpointing"] = self.activation_checkpointing
        return out


def _slurm_job() -> str | None:
    """This task's SLURM id as scancel/scontrol take it: ARRAY_TASK for an array task (the bare id
    of an array's first task would name the whole array)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _method(name: str, noise: float, gpus_per_job: int, oom_retry_overrides: dict):
    def factory(**overrides) -> PluginToy:
        method = PluginToy(**{"noise": noise, "gpus_per_job": gpus_per_job, **overrides})
        method.name, method.oom_retry_overrides = name, oom_retry_overrides
        return method

    return factory


if "toy_plugin" not in DATASETS:  # imported once per process; a second import must not re-register
    DATASETS.add("toy_plugin", toy_cohort, "toy cohort (30 patients, no slides)")
    METHODS.add("toy_a", _method("toy_a", 1.0, 1, {"activation_checkpointing": True}), "toy method, noise 1")
    METHODS.add("toy_b", _method("toy_b", 3.0, 2, {}),
                "toy method, noise 3; two GPUs (ranks) per job, no memory-saving setting to retry with")
