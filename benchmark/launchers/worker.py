"""A job process of the local launcher: `python -m benchmark.launchers.worker '<job spec JSON>'`.

It rebuilds cohort and method from the spec's options, runs the job (or the method's prepare stage)
and writes the result file. A multi-GPU job (spec.nprocs > 1) starts one rank per GPU through torchrun
(the elastic agent stays in this process) and every rank runs this module again.
The process ends when the runner that started it ends (even by SIGKILL), and on SIGTERM it stops
at once: result files are written atomically, so nothing is left half-written.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "WSI_BENCH_RUNNER_PID"  # set by the local launcher: the runner's pid


def die_with_parent(expected_parent: str | None) -> None:
    """Ask the kernel for SIGTERM when the parent dies; leave at once if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if expected_parent and os.getppid() != int(expected_parent):
        sys.exit("the runner that started this job is gone; not running it")


def _stop(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the atomic writes, which remove their temp files


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmark.launchers.worker '<job spec JSON>' (started by the local launcher)",
              file=sys.stderr)
        return 2
    is_rank = "LOCAL_RANK" in os.environ  # started by torchrun below
    die_with_parent(None if is_rank else os.environ.get(PARENT_ENV))
    signal.signal(signal.SIGTERM, _stop)
    nprocs = json.loads(argv[0]).get("nprocs", 1)
    if nprocs > 1 and not is_rank:  # the agent needs no benchmark imports: only the ranks run the job
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", f"--nproc-per-node={nprocs}", "-m", "benchmark.launchers.worker", argv[0]])
        return 0
    from benchmark.launchers.execution import JobSpec, execute_spec

    execute_spec(JobSpec.from_json(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
