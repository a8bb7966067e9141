"""benchmark.launchers.execution in this process: the out-of-memory retry decision every launcher takes,
and a job process (`execute_spec`) that builds only its own job, keeping that job's checks."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark.launchers.execution import (JobSpec, execute_spec, options_to_dict, plan_one, prepare_status_path,
                                           retry_overrides_after)
from benchmark.locks import JobLock, lock_path
from benchmark.results import read_result, write_result
from benchmark.runner import RunOptions, build_state, make_plan
from tests.test_launchers import PLUGIN, markers

LIGHTER = {"activation_checkpointing": True}
OOM = {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"}
OOM_TEXT = {"status": "failed", "error": "RuntimeError: CUDA error: out of memory"}
OTHER = {"status": "failed", "error": "ValueError: predictions lack columns ['risk']"}
OK = {"status": "ok"}


@pytest.mark.parametrize("record, retry_oom, declared, already_retried, expected", [
    (OOM, True, LIGHTER, False, LIGHTER),  # the one case that retries
    (OOM_TEXT, True, LIGHTER, False, LIGHTER),  # "out of memory" in the message counts too
    (OOM, False, LIGHTER, False, {}),  # no --retry-oom
    (OOM, True, None, False, {}),  # the method has no lighter setting
    (OOM, True, LIGHTER, True, {}),  # once: this attempt was the retry
    (OTHER, True, LIGHTER, False, {}),  # failed, not for memory
    (OK, True, LIGHTER, False, {}),
])
def test_retry_overrides_after(record, retry_oom, declared, already_retried, expected):
    method = SimpleNamespace() if declared is None else SimpleNamespace(oom_retry_overrides=declared)
    assert retry_overrides_after(record, method, retry_oom, already_retried) == expected


def options(tmp_path: Path, **kw) -> RunOptions:
    base = dict(methods=["toy_a"], dataset="toy_plugin", n_folds=2, out_dir=tmp_path / "out",
                leaderboard_dir=tmp_path / "lb", cache_dir=tmp_path / "cache", plugins=[PLUGIN], progress=False,
                overrides={"marker_dir": str(tmp_path / "marks")})
    base.update(kw)
    return RunOptions(**base)


def spec_for(opts: RunOptions, fold: int, **kw) -> JobSpec:
    planned = next(p for p in make_plan(opts).planned if p.job.fold == fold)
    return JobSpec(kind="job", options=options_to_dict(opts), method=planned.job.method, job=planned.job.__dict__,
                   config_hash=planned.config_hash, launch={"launcher": "local"}, **kw)


def result(opts: RunOptions, fold: int, method: str = "toy_a") -> dict:
    return read_result(Path(opts.out_dir) / f"results/toy/binary/{method}/fold{fold}_seed0.json")


def corrupt(opts: RunOptions, fold: int, method: str = "toy_a") -> Path:
    """Another job's result file that no reader can parse: planning that job would fail on it."""
    path = Path(opts.out_dir) / f"results/toy/binary/{method}/fold{fold}_seed0.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    return path


def test_plan_one_is_the_plans_entry_for_every_job(tmp_path):
    opts = options(tmp_path, methods=["toy_a", "toy_b"], seeds=[0, 1])
    first = make_plan(opts).planned[0]
    write_result(first.path, {"status": "ok", "config_hash": first.config_hash})  # one job done
    planned = make_plan(opts).planned
    assert [p.done for p in planned].count(True) == 1
    state = build_state(opts)
    assert state.planned == []
    assert [plan_one(opts, state, p.job) for p in planned] == planned


def test_job_process_reads_no_other_jobs_result_file(tmp_path):
    opts = options(tmp_path)
    spec = spec_for(opts, 0)
    other = corrupt(opts, 1)
    assert execute_spec(spec) == "ok"
    record = result(opts, 0)
    assert record["status"] == "ok" and record["launch"]["attempt"] == spec.attempt
    assert other.read_text() == "{not json"


def test_prepare_process_reads_no_result_file(tmp_path):
    opts = options(tmp_path, methods=["toy_prepared"])
    corrupt(opts, 0, "toy_prepared")
    spec = JobSpec(kind="prepare", options=options_to_dict(opts), method="toy_prepared")
    assert execute_spec(spec) == "ok"
    status = json.loads(prepare_status_path(opts, "toy", "toy_prepared").read_text())
    assert status == {"status": "ok", "attempt": spec.attempt}


def test_job_process_keeps_its_own_jobs_checks(tmp_path):
    opts = options(tmp_path)
    marks = tmp_path / "marks"
    with JobLock(lock_path(opts.out_dir, "toy_a/toy/binary/fold0/seed0")):  # another runner holds it
        assert execute_spec(spec_for(opts, 0, lock_here=True)) == "held"
    assert execute_spec(spec_for(opts, 0)) == "ok"
    assert execute_spec(spec_for(opts, 0, lock_here=True)) == "done"  # its own result file is complete
    assert markers(marks) == {"toy_a_fold0_seed0.rank0": 1}

    stale = spec_for(opts, 1)
    stale.config_hash = "0" * 16
    assert execute_spec(stale) == "failed"
    assert "the job's config changed since it was planned" in result(opts, 1)["error"]
    assert markers(marks) == {"toy_a_fold0_seed0.rank0": 1}  # never ran


def test_job_process_retries_with_the_lighter_settings(tmp_path):
    opts = options(tmp_path, overrides={"oom_on_fold": 0})
    assert execute_spec(spec_for(opts, 0, retry_overrides=LIGHTER)) == "ok"
    record = result(opts, 0)
    assert record["info"]["activation_checkpointing"] and record["launch"]["retry_overrides"] == LIGHTER


def test_job_process_retry_that_the_method_refuses_says_why(tmp_path, toy_a_refusing_checkpointing):
    opts = options(tmp_path, overrides={"oom_on_fold": 0})
    assert execute_spec(spec_for(opts, 0, retry_overrides=LIGHTER)) == "failed"
    record = result(opts, 0)
    assert record["error"] == ("out-of-memory retry with {'activation_checkpointing': True} impossible: "
                               "TypeError: unexpected setting activation_checkpointing")
    assert record["launch"]["retry_overrides"] == LIGHTER and "failure" not in record
