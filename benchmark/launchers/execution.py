"""One attempt at one job (or one method's prepare stage), wherever it runs: in the runner's own
process, in a worker process of the local launcher, or in a SLURM task.

A job that runs elsewhere is described by a `JobSpec` (plain JSON): the run's options, the job's
identity and the config hash it was planned with. The executing process rebuilds cohort, folds and
method from the options (plugins included) and that one job (not the method's whole plan: that would
read every job's result file), checks that the config hash is unchanged, runs the job and writes its
result file. Under torch.distributed only rank 0 writes a successful result; a rank that fails writes
the failure record itself and exits at once, so that the launcher stops the others.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmark import checkpoint, distributed, provenance
from benchmark.api import Method
from benchmark.jobs import Job, PlannedJob, _is_done, plan_job
from benchmark.locks import JobLock, lock_path
from benchmark.results import atomic_write_text, read_result, write_result
from benchmark.runner import RunOptions, RunState, build_methods, build_state, context, execute_job, job_dir, prepare

REPO_ROOT = provenance.REPO_ROOT  # launched processes run from the checkout


def options_to_dict(opts: RunOptions) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()}


def options_from_dict(data: dict) -> RunOptions:
    paths = {f.name for f in dataclasses.fields(RunOptions) if "Path" in str(f.type)}
    return RunOptions(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


@dataclass
class JobSpec:
    """What a worker process needs to run one job (kind 'job') or one method's prepare (kind 'prepare')."""

    kind: str
    options: dict
    method: str
    job: dict | None = None  # Job fields
    config_hash: str | None = None
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    nprocs: int = 1  # ranks (one per GPU) of a multi-GPU job
    retry_overrides: dict = field(default_factory=dict)  # method settings of an out-of-memory retry
    launch: dict = field(default_factory=dict)  # launcher, GPUs, log file: recorded in the result
    lock_here: bool = False  # take the job's lock where it runs (SLURM: the submitter may be gone)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)  # a Path in --set values travels as text

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        return cls(**json.loads(text))

    def run_options(self) -> RunOptions:
        return options_from_dict(self.options)


def prepare_status_path(opts: RunOptions, dataset: str, method: str) -> Path:
    return Path(opts.out_dir) / "work" / dataset / "prepare" / f"{method}.json"


def has_prepare(method: Method) -> bool:
    """Whether the method builds slide products at all (the base class's prepare does nothing)."""
    return type(method).prepare is not Method.prepare


def gpus_per_job(opts: RunOptions, method: Method) -> int:
    """--gpus-per-job when given, else what the method declares (`gpus_per_job`, default 1)."""
    return opts.gpus_per_job if opts.gpus_per_job is not None else int(getattr(method, "gpus_per_job", 1))


def oom_retry_overrides(method: Method) -> dict:
    """Settings that make a method use less GPU memory (e.g. activation checkpointing), which an
    out-of-memory job is retried with under --retry-oom. A method declares them as
    `oom_retry_overrides` (Pixel-Mamba: {"checkpoint_layers": True}); a method that declares none has
    no lighter setting and is not retried."""
    return dict(getattr(method, "oom_retry_overrides", {}))


def is_out_of_memory(record: dict) -> bool:
    error = record.get("error", "")
    return record.get("status") == "failed" and ("OutOfMemoryError" in error or "out of memory" in error.lower())


def retry_overrides_after(record: dict, method: Method, retry_oom: bool, already_retried: bool) -> dict:
    """The settings to run the job once more with after this attempt's record, {} for no retry: only an
    out-of-memory failure under --retry-oom, of a method that declares lighter settings, and only once
    (`already_retried`: this attempt was the retry)."""
    if already_retried or not (retry_oom and is_out_of_memory(record)):
        return {}
    return oom_retry_overrides(method)


def failure_record(planned: PlannedJob, error: str) -> dict:
    return {"job": planned.job.__dict__, "config": planned.config, "config_hash": planned.config_hash,
            "status": "failed", "error": error, "finished_at": datetime.now(timezone.utc).isoformat()}


def annotate(record: dict, spec_attempt: str, launch: dict, retry_overrides: dict) -> dict:
    """What the launcher adds to a record: how the job ran, and why it failed when that was memory."""
    record["launch"] = {**launch, "attempt": spec_attempt, "world_size": distributed.world().size}
    if retry_overrides:
        record["launch"]["retry_overrides"] = retry_overrides
    if is_out_of_memory(record):
        record["failure"] = "out_of_memory"
    return record


def build_method(opts: RunOptions, name: str, extra_overrides: dict) -> Method:
    return build_methods(dataclasses.replace(opts, methods=[name], overrides={**opts.overrides, **extra_overrides}))[name]


class OverridesRefused(Exception):
    """The method cannot be built with an out-of-memory retry's settings (the message says why)."""


def prepared_attempt(opts: RunOptions, state: RunState, planned: PlannedJob, retry_overrides: dict) -> dict:
    """Prepare the job's method and run the job in this process; with `retry_overrides` (an out-of-memory
    retry) the method is first rebuilt with them, and OverridesRefused is raised when it does not take them."""
    method = state.methods[planned.job.method]
    if retry_overrides:
        try:
            method = build_method(opts, planned.job.method, retry_overrides)
        except Exception as err:
            raise OverridesRefused(f"{type(err).__name__}: {err}") from err
    return run_attempt(opts, state, planned, method, prepare(method, state.cohort, context(opts)))


def run_attempt(opts: RunOptions, state: RunState, planned: PlannedJob, method: Method,
                prepare_error: str | None) -> dict:
    """Run one job in this process and return its record (never raises for job errors)."""
    if prepare_error:
        return failure_record(planned, prepare_error)
    folder = job_dir(opts, planned)
    checkpoint.claim_job_dir(folder, planned.config_hash)
    fold = next(f for f in state.folds if f.index == planned.job.fold)
    return execute_job(planned, method, state.cohort, state.task, fold, context(opts, folder))


def store(opts: RunOptions, planned: PlannedJob, record: dict) -> None:
    """Write the result file; a finished job's training state is no longer needed."""
    write_result(planned.path, record)
    if record["status"] == "ok":
        checkpoint.clear(job_dir(opts, planned))


def attempt_record(path: Path, attempt: str) -> dict | None:
    """The result this attempt wrote, if any (a result file from an earlier attempt does not count)."""
    try:
        record = read_result(path)
    except (OSError, ValueError):
        return None
    return record if record.get("launch", {}).get("attempt") == attempt else None


def is_done(planned: PlannedJob) -> bool:
    """Finished with this config, by this runner or another one."""
    return _is_done(planned.path, planned.config_hash)


def plan_one(opts: RunOptions, state: RunState, job: Job) -> PlannedJob:
    """The job as `benchmark.jobs.plan` plans it (config, hash, result file, done), reading no other
    job's result file: a job process needs only its own job, and planning the method's every job in each
    of hundreds of job processes would read the results folder quadratically often."""
    fold = next(f for f in state.folds if f.index == job.fold)
    return plan_job(job, state.methods[job.method].config(), state.cohort, state.task, fold,
                    len(state.folds), opts.out_dir, opts.max_epochs, opts.weights)


# ---- in a worker process / SLURM task -----------------------------------------------------------
def execute_spec(spec: JobSpec) -> str:
    """Run the spec in this process (a rank of the job when torchrun's environment says so).
    Returns the job's status ('ok' / 'failed')."""
    opts = spec.run_options()
    world = distributed.init_from_env(opts.device)
    try:
        if spec.kind == "prepare":
            return _prepare_stage(spec, opts, world)
        return _job(spec, opts, world)
    finally:
        distributed.shutdown()


def _prepare_stage(spec: JobSpec, opts: RunOptions, world: distributed.World) -> str:
    state = build_state(dataclasses.replace(opts, methods=[spec.method]))
    error = prepare(state.methods[spec.method], state.cohort, context(opts))
    if world.is_main:
        status = {"status": "failed", "error": error} if error else {"status": "ok"}
        atomic_write_text(prepare_status_path(opts, state.cohort.name, spec.method),
                          json.dumps({**status, "attempt": spec.attempt}))
    return "failed" if error else "ok"


def _job(spec: JobSpec, opts: RunOptions, world: distributed.World) -> str:
    """Returns 'ok' / 'failed', or without running: 'held' (another runner has the job's lock) /
    'done' (finished by another runner since it was planned)."""
    state = build_state(dataclasses.replace(opts, methods=[spec.method]))
    planned = plan_one(opts, state, Job(**spec.job))
    lock = JobLock(lock_path(opts.out_dir, planned.job.name)) if spec.lock_here else None
    if lock is not None:
        decision = "run"
        if world.is_main:
            decision = "held" if not lock.try_acquire() else "done" if is_done(planned) else "run"
        decision = distributed.broadcast(decision, world)
        if decision != "run":
            lock.release()
            return decision
    try:
        record = _attempt(spec, opts, state, planned)
    finally:
        if lock is not None:
            lock.release()
    if world.is_main or record["status"] != "ok":
        store(opts, planned, record)
    if record["status"] != "ok" and world.size > 1:
        # the other ranks may wait in a collective for this one: leave now, torchrun / srun stops them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return record["status"]


def _attempt(spec: JobSpec, opts: RunOptions, state: RunState, planned: PlannedJob) -> dict:
    if planned.config_hash != spec.config_hash:
        record = failure_record(planned, f"the job's config changed since it was planned ({spec.config_hash} -> "
                                         f"{planned.config_hash}: code, data or settings changed); rerun the benchmark")
    else:
        try:
            record = prepared_attempt(opts, state, planned, spec.retry_overrides)
        except OverridesRefused as err:  # the method does not take the memory-saving setting
            record = failure_record(planned, f"out-of-memory retry with {spec.retry_overrides} impossible: {err}")
    return annotate(record, spec.attempt, spec.launch, spec.retry_overrides)
