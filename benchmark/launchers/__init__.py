"""Launchers: how the jobs of a plan run. `local` (default): on this machine, in this process or one
process per job on free GPUs (launchers/local.py); `slurm`: as SLURM job arrays through submitit
(launchers/slurm.py). Both write the same result files, so leaderboards do not depend on the launcher."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmark.runner import RunOptions, RunState, RunSummary

LAUNCHERS = ("local", "slurm")


def launch(opts: "RunOptions", state: "RunState", summary: "RunSummary") -> None:
    """Run every job of `state.planned` that is not done, recording outcomes in `summary`."""
    if opts.launcher == "local":
        from benchmark.launchers.local import launch_local

        launch_local(opts, state, summary)
    elif opts.launcher == "slurm":
        try:
            from benchmark.launchers.slurm import launch_slurm
        except ImportError as err:
            raise ValueError(f"--launcher slurm needs submitit ({err}): pip install submitit") from err

        launch_slurm(opts, state, summary)
    else:
        raise ValueError(f"unknown launcher '{opts.launcher}'; use one of {', '.join(LAUNCHERS)}")
