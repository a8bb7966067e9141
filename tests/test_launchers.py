"""The local launcher: job processes on (named) GPUs, multi-rank jobs, out-of-memory jobs, SIGKILL and
Ctrl-C, two runners on one folder. The toy plugin registers the methods in every job process."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmark import cli
from benchmark.launchers.execution import REPO_ROOT, options_from_dict, options_to_dict
from benchmark.launchers.progress import Counts, StatusLine
from benchmark.locks import JobLock, lock_path
from benchmark.results import iter_results
from tests.toy import leaderboard_text
from benchmark.runner import RunOptions, RunSummary, run

PLUGIN = "tests.toy_plugin"


def options(tmp_path: Path, name: str, **kw) -> RunOptions:
    base = dict(methods=["toy_a", "toy_b"], dataset="toy_plugin", n_folds=2, out_dir=tmp_path / name,
                leaderboard_dir=tmp_path / f"{name}_lb", cache_dir=tmp_path / "cache", plugins=[PLUGIN], progress=False)
    base.update(kw)
    return RunOptions(**base)


def results(out_dir: Path) -> dict[str, tuple]:
    """Job -> (status, predictions): what must not depend on how the jobs ran."""
    return {f"{r['job']['method']}/fold{r['job']['fold']}": (r["status"], r.get("predictions"))
            for r in iter_results(out_dir)}


def leaderboard(opts: RunOptions) -> str:
    return leaderboard_text(Path(opts.leaderboard_dir) / "toy_binary.md")


def marker_files(folder: Path) -> list[Path]:
    """The files the toy method writes when a job starts (one per execution and rank)."""
    return [p for p in Path(folder).glob("*") if not p.name.startswith(".")]


def markers(folder: Path) -> Counter:
    """Executions per job and rank, e.g. {'toy_a_fold0_seed0.rank0': 1}."""
    return Counter(".".join(p.name.split(".")[:2]) for p in marker_files(folder))


def cli_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "run_benchmark.py", "--plugin", PLUGIN, "--method", "toy_a,toy_b", "--dataset", "toy_plugin",
            "--folds", "2", "--out", str(out), "--leaderboard-dir", str(out) + "_lb",
            "--cache-dir", str(out.parent / "cache"), "--no-progress", *extra]


def wait_for(condition, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")  # a zombie has ended


# ---- job processes -------------------------------------------------------------------------------------
def test_job_processes_on_gpus_give_the_in_process_results(tmp_path):
    """Two (named) GPUs: toy_a jobs get one each, toy_b jobs (gpus_per_job 2) both, as two torchrun
    ranks (gloo here: device cpu). Fold 1 runs out of memory: toy_a's is retried with activation
    checkpointing, toy_b's (no memory-saving setting) fails on both ranks and is recorded."""
    reference = options(tmp_path, "ref", retry_oom=True, overrides={"oom_on_fold": 1})
    run(reference)
    opts = options(tmp_path, "gpus", gpus=[0, 1], retry_oom=True,
                   overrides={"oom_on_fold": 1, "marker_dir": str(tmp_path / "marks")})
    summary = run(opts)
    assert list(summary.failed) == ["toy_b/toy/binary/fold1/seed0"] and len(summary.ran) == 4
    assert results(opts.out_dir) == results(reference.out_dir)
    assert leaderboard(opts) == leaderboard(reference)
    records = {f"{r['job']['method']}/fold{r['job']['fold']}": r for r in iter_results(opts.out_dir)}
    for fold in (0, 1):
        a = records[f"toy_a/fold{fold}"]
        assert a["info"]["env"]["CUDA_VISIBLE_DEVICES"] in ("0", "1") and a["launch"]["world_size"] == 1
        assert Path(a["launch"]["log"]).exists()
    b = records["toy_b/fold0"]
    assert b["info"]["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and b["info"]["env"]["WORLD_SIZE"] == "2"
    assert b["launch"]["world_size"] == 2 and b["launch"]["gpus"] == [0, 1]
    assert records["toy_a/fold1"]["launch"]["retry_overrides"] == {"activation_checkpointing": True}
    assert records["toy_a/fold1"]["info"]["activation_checkpointing"] is True
    assert records["toy_b/fold1"]["failure"] == "out_of_memory"
    runs = markers(tmp_path / "marks")
    assert runs["toy_a_fold0_seed0.rank0"] == 1 and runs["toy_a_fold1_seed0.rank0"] == 2  # out of memory, retried
    assert runs["toy_b_fold0_seed0.rank0"] == runs["toy_b_fold0_seed0.rank1"] == 1  # one execution, two ranks
    assert runs["toy_b_fold1_seed0.rank0"] + runs["toy_b_fold1_seed0.rank1"] >= 1  # torchrun stops the other rank


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_jobs_see_only_their_gpus_and_multi_gpu_jobs_join_nccl(tmp_path):
    opts = options(tmp_path, "cuda", gpus=[0, 1], device="cuda")
    assert not run(opts).failed
    for record in iter_results(opts.out_dir):
        width = 2 if record["job"]["method"] == "toy_b" else 1
        assert record["info"]["cuda_devices"] == width and record["launch"]["world_size"] == width
        assert record["device"].startswith(torch.cuda.get_device_name(0))


def test_prepare_stage_runs_once_before_its_jobs_and_a_failed_one_fails_only_its_jobs(tmp_path):
    marks = tmp_path / "marks"
    reference = options(tmp_path, "ref", methods=["toy_prepared", "toy_unpreparable"], cache_dir=tmp_path / "c1")
    run(reference)
    opts = options(tmp_path, "procs", methods=["toy_prepared", "toy_unpreparable"], cpu_jobs=2,
                   cache_dir=tmp_path / "c2", overrides={"marker_dir": str(marks)})
    summary = run(opts)
    assert sorted(summary.failed) == ["toy_unpreparable/toy/binary/fold0/seed0", "toy_unpreparable/toy/binary/fold1/seed0"]
    assert all(e == "prepare failed: RuntimeError: slide products could not be built (simulated)"
               for e in summary.failed.values())
    assert results(opts.out_dir) == results(reference.out_dir) and leaderboard(opts) == leaderboard(reference)
    builds = [p for p in marker_files(marks) if p.name.startswith("prepare_")]
    jobs = [p for p in marker_files(marks) if not p.name.startswith("prepare_")]
    assert len(builds) == 1 and len(jobs) == 2  # built once, by the prepare stage; no job of the failed method
    assert builds[0].stat().st_mtime <= min(p.stat().st_mtime for p in jobs)
    assert (opts.out_dir / "logs" / "toy" / "prepare_toy_prepared.log").exists()


def test_out_of_memory_job_is_recorded_and_the_rest_finish(tmp_path):
    opts = options(tmp_path, "oom", overrides={"oom_on_fold": 1})
    summary = run(opts)  # no --retry-oom
    assert sorted(summary.failed) == ["toy_a/toy/binary/fold1/seed0", "toy_b/toy/binary/fold1/seed0"]
    failed = json.loads((opts.out_dir / "results/toy/binary/toy_a/fold1_seed0.json").read_text())
    assert failed["status"] == "failed" and failed["failure"] == "out_of_memory"
    assert failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert {r["status"] for r in iter_results(opts.out_dir) if r["job"]["fold"] == 0} == {"ok"}
    assert "toy_a fold 1 seed 0 failed: OutOfMemoryError" in leaderboard(opts)


def test_out_of_memory_retry_that_the_method_refuses_keeps_the_failure(tmp_path, toy_a_refusing_checkpointing):
    summary = run(options(tmp_path, "refused", methods=["toy_a"], retry_oom=True, overrides={"oom_on_fold": 1}))
    error = summary.failed["toy_a/toy/binary/fold1/seed0"]
    assert error.startswith("OutOfMemoryError") and "retry with {'activation_checkpointing': True} impossible" in error


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_results(tmp_path):
    reference = options(tmp_path, "ref")
    run(reference)
    out, marks = tmp_path / "cut", tmp_path / "marks"
    proc = subprocess.Popen(cli_command(out, "--cpu-jobs", "1", "--set", "sleep_s=1.5", "--set", f"marker_dir={marks}"),
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(out.glob("results/*/*/*/*.json"))) >= 2 and len(marker_files(marks)) >= 3,
                 what="two finished jobs and a third one started")
        busy = json.loads(max(marker_files(marks), key=lambda p: p.stat().st_mtime).read_text())["pid"]  # mid-job
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: not process_alive(busy), 30, "the orphaned job process to end")
    finished = {(p.parent.name, p.stem) for p in out.glob("results/*/*/*/*.json")}
    rerun = run(options(tmp_path, "cut", overrides={"marker_dir": str(marks)}))
    assert len(rerun.ran) == 4 - len(finished)
    assert results(out) == results(reference.out_dir)
    assert leaderboard_text(tmp_path / "cut_lb" / "toy_binary.md") == leaderboard(reference)
    runs = markers(marks)
    for method in ("toy_a", "toy_b"):
        for fold in (0, 1):
            ran = runs[f"{method}_fold{fold}_seed0.rank0"]
            assert ran == 1 if (method, f"fold{fold}_seed0") in finished else ran >= 1  # finished: not run again
    assert sum(runs.values()) <= 5  # four jobs, plus at most the one killed mid-job
    assert not list(out.rglob("*.tmp"))


def test_two_runners_on_one_folder_never_run_a_job_twice(tmp_path):
    out, marks = tmp_path / "shared", tmp_path / "marks"
    command = cli_command(out, "--folds", "3", "--set", "sleep_s=0.4", "--set", f"marker_dir={marks}")
    runners = [subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [r.communicate(timeout=300) for r in runners]
    assert [r.returncode for r in runners] == [0, 0], outputs
    runs = markers(marks)
    assert len(runs) == 6 and set(runs.values()) == {1}, runs
    assert len([r for r in iter_results(out) if r["status"] == "ok"]) == 6
    assert len(list((out / "provenance").glob("run_*.json"))) == 2  # one record per runner


def test_ctrl_c_stops_job_processes_and_leaves_no_partial_file(tmp_path):
    out, marks = tmp_path / "stopped", tmp_path / "marks"
    proc = subprocess.Popen(cli_command(out, "--cpu-jobs", "1", "--set", "sleep_s=60", "--set", f"marker_dir={marks}"),
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker_files(marks), what="a job to start")
        worker = json.loads(marker_files(marks)[0].read_text())["pid"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED and "run the same command again to resume" in err
    assert not process_alive(worker)
    assert not list(out.glob("results/*/*/*/*.json")) and not list(out.rglob("*.tmp"))


# ---- pieces ------------------------------------------------------------------------------------------
def test_job_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    path = lock_path(tmp_path, "m/d/t/fold0/seed0")
    first, second = JobLock(path), JobLock(path)
    assert first.try_acquire() and not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               "from benchmark.locks import JobLock; JobLock(sys.argv[1]).try_acquire();"
                               "print('held', flush=True); time.sleep(60)", str(path)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert not first.try_acquire()
    holder.kill()
    holder.wait()
    assert first.try_acquire()  # the kernel dropped the dead process's lock
    first.release()


def test_options_travel_to_job_processes_unchanged(tmp_path):
    opts = options(tmp_path, "x", gpus=[1, 3], overrides={"lr": 0.1}, sbatch_flags=["qos=high"], data_root=None)
    assert options_from_dict(json.loads(json.dumps(options_to_dict(opts)))) == opts


def test_cli_scheduling_flags_reach_run_options(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("benchmark.runner.run", lambda opts, state, argv: seen.append(opts) or RunSummary(state.planned))
    code = cli.main(["--plugin", PLUGIN, "--method", "toy_a", "--dataset", "toy_plugin", "--folds", "2",
                     "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--launcher", "slurm",
                     "--gpus-per-job", "0", "--partition", "gpu", "--time", "2:00:00", "--account", "lab",
                     "--sbatch-flag", "qos=high", "--retry-oom"])
    assert code == cli.EXIT_OK
    opts = seen[0]
    assert (opts.launcher, opts.gpus_per_job, opts.device, opts.partition, opts.time, opts.account) == \
        ("slurm", 0, "cpu", "gpu", "2:00:00", "lab")
    assert (opts.sbatch_flags, opts.retry_oom, opts.plugins) == (["qos=high"], True, [PLUGIN])
    with pytest.raises(ValueError, match="--gpus-per-job"):
        cli.resolve_gpus_and_device(cli.parse_args(["--launcher", "slurm", "--gpus", "0"]))


def test_cli_unknown_plugin_and_gpus_without_cuda_exit_2(tmp_path, capsys, monkeypatch):
    assert cli.main(["--plugin", "tests.no_such_plugin", "--list"]) == cli.EXIT_USAGE
    assert "--plugin tests.no_such_plugin: cannot import it" in capsys.readouterr().err
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = cli.main(["--plugin", PLUGIN, "--method", "toy_a", "--dataset", "toy_plugin", "--gpus", "all",
                     "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])
    assert code == cli.EXIT_USAGE and "no CUDA GPU is visible" in capsys.readouterr().err


def test_provenance_records_command_config_versions_commit_and_hardware(tmp_path):
    opts = options(tmp_path, "prov", methods=["toy_a"])
    run(opts, argv=["run_benchmark.py", "--method", "toy_a"])
    record = json.loads(next((opts.out_dir / "provenance").glob("run_*.json")).read_text())
    assert record["argv"] == ["run_benchmark.py", "--method", "toy_a"]
    assert record["method_configs"] == {"toy_a": {"noise": 1.0}} and record["jobs_planned"] == 2
    assert record["options"]["launcher"] == "local" and "torch" in record["versions"]
    assert record["git_commit"] and record["hardware"]["cpus"] >= 1


def test_status_line_counts_and_estimate():
    status = StatusLine(capacity=2, enabled=False)
    assert status.text(Counts(done=0, running=2, queued=4)).startswith("jobs: 0 done, 0 failed, 2 running, 4 queued")
    status.finished(30.0)
    status.finished(90.0)
    # 6 jobs left at 60 s each on 2 slots: 3 minutes
    assert status.text(Counts(done=2, running=2, queued=4)).endswith("about 3:00 left")
    assert "1 held by another runner" in status.text(Counts(queued=1, elsewhere=1))
