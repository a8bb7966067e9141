"""`--plugin tests.toy_plugin`: the toy cohort and two toy methods, registered on import, so that job
processes (local workers, SLURM tasks) can build them too. Knobs for fault tests (none of them part
of the config hash): `sleep_s` per job, `marker_dir` (one file per execution, to count them),
`oom_on_fold` (raises CUDA out-of-memory unless `activation_checkpointing`), `gpus_per_job`."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import torch

from benchmark.registry import DATASETS, METHODS
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
            Path(self.marker_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.marker_dir) / name).write_text(str(os.getpid()))
        time.sleep(self.sleep_s)
        if fold.index == self.oom_on_fold and not self.activation_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        out = super().run_fold(cohort, task, fold, seed, ctx)
        out.info["env"] = {k: os.environ.get(k) for k in ENV_KEYS}
        out.info["activation_checkpointing"] = self.activation_checkpointing
        return out


def _method(name: str, noise: float):
    def factory(**overrides) -> PluginToy:
        method = PluginToy(**{"noise": noise, **overrides})
        method.name = name
        return method

    return factory


if "toy_plugin" not in DATASETS:  # imported once per process; a second import must not re-register
    DATASETS.add("toy_plugin", toy_cohort, "toy cohort (30 patients, no slides)")
    METHODS.add("toy_a", _method("toy_a", 1.0), "toy method, noise 1")
    METHODS.add("toy_b", _method("toy_b", 3.0), "toy method, noise 3")
