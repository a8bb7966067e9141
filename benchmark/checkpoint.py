"""Per-epoch training state of a long job, so that a job killed mid-training (Ctrl-C, SIGKILL, a node
lost, a SLURM time limit) resumes from its last finished epoch instead of from scratch.

A trainer calls, with `ctx.job_dir` (kept across restarts, cleared when the job's config changes):

    start, extra = checkpoint.resume(ctx.job_dir, model=model, optimizer=opt, scheduler=sched, rng=rng)
    for epoch in range(start, epochs):
        ...one epoch...
        checkpoint.save(ctx.job_dir, epoch + 1, model=model, optimizer=opt, scheduler=sched, rng=rng,
                        extra={"history": history})

Both are no-ops when `job_dir` is None (a method used outside the runner). The state carries the
torch / numpy / python random states, so a resumed run draws the same numbers as an uninterrupted one.
Under torch.distributed, rank 0 writes the model state and every rank its own random state.
The runner deletes the state once the job's result is written.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark import distributed
from benchmark.results import atomic_write, atomic_write_text

STATE_DIR = "train_state"
CONFIG_MARK = "config_hash"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves half a file."""
    atomic_write(path, lambda fh: torch.save(obj, fh), mode="wb")


def random_states() -> dict:
    """python's, numpy's, torch's and CUDA's generator states. numpy's key array is kept as a tensor, so
    the states load with torch.load(weights_only=True) (pretraining checkpoints are loaded that way)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    in_use = torch.cuda.is_available() and torch.cuda.is_initialized()  # reading them would start CUDA
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if in_use else []}


def set_random_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    # np.asarray: the keys are a tensor, or an array in the runner's states saved before random_states
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():  # [] (or, in the runner's older states, absent): CUDA unused
        torch.cuda.set_rng_state_all(states["cuda"])


def save(job_dir: Path | None, epoch: int, *, model: torch.nn.Module, optimizer=None, scheduler=None,
         rng: np.random.Generator | None = None, extra: dict | None = None) -> None:
    """Record that `epoch` epochs are finished (the next run starts at epoch `epoch`)."""
    if job_dir is None:
        return
    folder = Path(job_dir) / STATE_DIR
    rank = distributed.world().rank
    if rank == 0:
        state = {"epoch": epoch, "model": distributed.unwrap(model).state_dict(), "extra": extra or {},
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "generator": rng.bit_generator.state if rng is not None else None}
        atomic_save(state, folder / "state.pt")
    atomic_save({"epoch": epoch, "random": random_states()}, folder / f"random_rank{rank}.pt")


def resume(job_dir: Path | None, *, model: torch.nn.Module, optimizer=None, scheduler=None,
           rng: np.random.Generator | None = None) -> tuple[int, dict]:
    """Load the last saved state into the given objects. Returns (epochs already done, extra);
    (0, {}) when there is nothing to resume."""
    path = Path(job_dir) / STATE_DIR / "state.pt" if job_dir is not None else None
    if path is None or not path.exists():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=False)
    distributed.unwrap(model).load_state_dict(state["model"])
    for target, key in ((optimizer, "optimizer"), (scheduler, "scheduler")):
        if target is not None and state[key] is not None:
            target.load_state_dict(state[key])
    if rng is not None and state["generator"] is not None:
        rng.bit_generator.state = state["generator"]
    random_path = path.parent / f"random_rank{distributed.world().rank}.pt"
    if random_path.exists():
        saved = torch.load(random_path, map_location="cpu", weights_only=False)
        if saved["epoch"] == state["epoch"]:  # killed between the two writes: keep the fresh state
            set_random_states(saved["random"])
    return int(state["epoch"]), state["extra"]


def claim_job_dir(job_dir: Path, config_hash: str) -> None:
    """Drop training state left in this job's folder by a run with another config (same method, fold
    and seed, different settings): resuming it would mix two configs."""
    job_dir = Path(job_dir)
    mark = job_dir / CONFIG_MARK
    if mark.exists() and mark.read_text().strip() != config_hash:
        clear(job_dir)
    atomic_write_text(mark, config_hash + "\n")


def clear(job_dir: Path) -> None:
    shutil.rmtree(Path(job_dir) / STATE_DIR, ignore_errors=True)
