"""The SLURM launcher against a real one-node SLURM started here (tests/slurm_cluster.py): job arrays,
a two-task (two-rank) job, a preempted job that submitit requeues, and the local launcher's leaderboard.
Skipped, with the reason, where SLURM cannot start (no root, no apt-get, no network for the install)."""
import json
import os
import threading
import time
from pathlib import Path

import pytest

from benchmark.launchers.slurm import partition_time_limit, sbatch_parameters, time_minutes
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
    methods = ["toy_a", "toy_b", "toy_prepared", "toy_unpreparable"]
    reference = options(tmp_path, "local", methods=methods, cache_dir=tmp_path / "local_cache")
    run(reference)
    marks, holds = tmp_path / "marks", tmp_path / "holds"
    holds.mkdir()
    (holds / "toy_a_fold1").touch()  # toy_a fold 1 waits mid-job until it has been preempted
    opts = options(tmp_path, "slurm", methods=methods, launcher="slurm", time="10",
                   overrides={"marker_dir": str(marks), "hold_dir": str(holds)})
    outcome = {}

    def submit():
        try:
            outcome["summary"] = run(opts)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    submitter = threading.Thread(target=submit)
    submitter.start()
    held = lambda: [m for m in marker_files(marks) if m.name.startswith("toy_a_fold1_")]  # noqa: E731
    wait_for(held, 180, "toy_a fold 1 to run")
    job = json.loads(held()[0].read_text())["slurm_job"]
    # preemption: submitit checkpoints and requeues the job (scancel may report the step it could not
    # signal once the job is being requeued: its exit code says nothing here, the log below does)
    slurm.run("scancel", "--signal=USR2", job, check=False)
    deadline = time.monotonic() + 300
    while submitter.is_alive() and time.monotonic() < deadline:
        if squeue(slurm, job)[0] == "PENDING":  # requeued; SLURM would hold it ~2 min: make it eligible now
            (holds / "toy_a_fold1").unlink(missing_ok=True)
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        submitter.join(timeout=1)
    assert not submitter.is_alive() and "error" not in outcome, outcome
    summary = outcome["summary"]
    assert len(summary.ran) == 8 and sorted(summary.failed) == [f"toy_unpreparable/toy/binary/fold{k}/seed0" for k in (0, 1)]
    assert results(opts.out_dir) == results(reference.out_dir)
    assert leaderboard(opts) == leaderboard(reference)
    runs = markers(marks)
    assert runs["toy_a_fold1_seed0.rank0"] == 2 and runs["toy_a_fold0_seed0.rank0"] == 1  # preempted, run again
    assert runs["toy_b_fold0_seed0.rank0"] == runs["toy_b_fold0_seed0.rank1"] == 1  # a two-task job
    assert runs["prepare_toy_prepared.rank0"] == 1  # the prepare job built the product; its jobs found it
    for record in iter_results(opts.out_dir):
        if record["job"]["method"] == "toy_unpreparable":
            assert record["error"] == "prepare failed: RuntimeError: slide products could not be built (simulated)"
            continue
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


@pytest.mark.slurm
def test_default_time_limit_is_the_partitions(slurm):
    assert partition_time_limit(None) == 24 * 60  # the test partition has no limit
    with pytest.raises(ValueError, match="partition nowhere not found"):
        partition_time_limit("nowhere")


def test_slurm_launcher_without_sbatch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="sbatch` is not on PATH"):
        run(options(tmp_path, "x", launcher="slurm"))
