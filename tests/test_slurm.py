"""The SLURM launcher against a real one-node SLURM started here (tests/slurm_cluster.py): job arrays,
a two-task (two-rank) job, a preempted job that submitit requeues, and the local launcher's leaderboard.
Skipped, with the reason, where SLURM cannot start (no root, no apt-get, no network for the install)."""
import json
import os
import threading
from pathlib import Path

import pytest

from benchmark.launchers.slurm import sbatch_parameters, time_minutes
from benchmark.results import iter_results
from benchmark.runner import run
from tests.slurm_cluster import LocalSlurm, SlurmUnavailable
from tests.test_launchers import leaderboard, marker_files, markers, options, results, wait_for


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.env)  # sbatch / squeue / scancel of submitit and of the launcher
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def squeue(cluster: LocalSlurm, job: str) -> tuple[str, str]:
    """(state, reason) of one job ('', '') when the controller does not list it."""
    line = cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%r", check=False).stdout.strip()
    return tuple(line.split("|")) if line else ("", "")


@pytest.mark.slurm
def test_slurm_runs_the_benchmark_and_gives_the_local_leaderboard(slurm, tmp_path):
    reference = options(tmp_path, "local")
    run(reference)
    marks = tmp_path / "marks"
    opts = options(tmp_path, "slurm", launcher="slurm", time="10",
                   overrides={"sleep_s": 3, "marker_dir": str(marks)})
    outcome = {}

    def submit():
        try:
            outcome["summary"] = run(opts)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    submitter = threading.Thread(target=submit)
    submitter.start()
    # preempt a running one-task job once it is inside the method: submitit checkpoints and requeues it
    first = lambda: [m for m in marker_files(marks) if m.name.startswith("toy_a")]  # noqa: E731
    wait_for(first, 180, "a toy_a job to run")
    job = json.loads(first()[0].read_text())["slurm_job"]
    slurm.run("scancel", "--signal=USR2", job)
    wait_for(lambda: squeue(slurm, job) == ("PENDING", "BeginTime") or not submitter.is_alive(), 60,
             "the preempted job to be requeued")
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")  # SLURM holds a requeued job ~2 min
    submitter.join(timeout=300)
    assert not submitter.is_alive() and "error" not in outcome, outcome
    summary = outcome["summary"]
    assert not summary.failed and len(summary.ran) == 4
    assert results(opts.out_dir) == results(reference.out_dir)
    assert leaderboard(opts) == leaderboard(reference)
    runs = markers(marks)
    requeued = next(m.name.split(".")[0] for m in first() if json.loads(m.read_text())["slurm_job"] == job)
    assert runs[f"{requeued}.rank0"] == 2  # preempted, requeued, run again
    assert runs["toy_b_fold0_seed0.rank0"] == runs["toy_b_fold0_seed0.rank1"] == 1  # a two-task job
    for record in iter_results(opts.out_dir):
        assert record["launch"]["launcher"] == "slurm"
        assert record["launch"]["world_size"] == (2 if record["job"]["method"] == "toy_b" else 1)
        assert Path(record["launch"]["log"]).exists()
    log = (opts.out_dir / "slurm_logs" / f"{job}_0_log.out").read_text()
    assert f"Requeued job {job}" in log and log.count("Starting with JobEnvironment") == 2


def test_slurm_time_and_sbatch_flags_parse():
    assert [time_minutes(t) for t in ("30", "4:00:00", "1-12:00:00", "2-3", "90:30", "0:30:01")] == \
        [30, 240, 2160, 3060, 91, 31]
    with pytest.raises(ValueError, match="SLURM time"):
        time_minutes("4h")
    assert sbatch_parameters(["qos=high", "--cpus-per-task=8", "--exclusive"]) == \
        {"qos": "high", "cpus_per_task": "8", "exclusive": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sbatch_parameters(["=x"])
