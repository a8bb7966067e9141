"""The local launcher (the default): every job of the plan on this machine.

Two ways to run, one behaviour (same results, locks, out-of-memory handling, status line):
- in this process, one job after another: on the CPU when `cpu_jobs` is 0 (fast to start: tests, demo);
- one process per job (`python -m benchmark.launchers.worker <spec>`), started as GPUs free up: with
  `--gpus 0,1,...` each job gets its GPUs through CUDA_VISIBLE_DEVICES (a multi-GPU job gets several
  and runs one rank per GPU); on the CPU with `--cpu-jobs N`, N jobs at a time.

A method's prepare stage (feature extraction) runs before its jobs, one prepare at a time (methods
that share an encoder then find its features cached). A job whose lock another runner holds is
skipped and checked again later; if that runner finished it, it is not run again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from benchmark.jobs import PlannedJob
from benchmark.launchers.execution import (REPO_ROOT, JobSpec, OverridesRefused, annotate, attempt_record,
                                           failure_record, gpus_per_job, has_prepare, is_done, options_to_dict,
                                           prepare_status_path, prepared_attempt, retry_overrides_after,
                                           run_attempt, store)
from benchmark.launchers.progress import Counts, StatusLine
from benchmark.launchers.worker import PARENT_ENV
from benchmark.locks import JobLock, lock_path
from benchmark.results import read_result
from benchmark.runner import RunOptions, RunState, RunSummary, context, prepare

POLL_S = 0.2
STOP_GRACE_S = 10.0


def resolve_gpus(text: str) -> list[int]:
    """`--gpus`: '' (CPU), 'all', or comma-separated ids of the visible CUDA devices."""
    if not text:
        return []
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--gpus {text} given but no CUDA GPU is visible; drop --gpus to run on the CPU")
    if text == "all":
        return list(range(count))
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpus {text}: expected 'all' or comma-separated GPU ids such as 0,1") from None
    bad = [i for i in ids if not 0 <= i < count]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus {text}: ids must be distinct, from 0 to {count - 1} ({count} GPUs visible)")
    return ids


def visible_devices(ids: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a job: our ids count within the runner's own CUDA_VISIBLE_DEVICES."""
    outer = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return ",".join(outer[i] if outer else str(i) for i in ids)


def launch_local(opts: RunOptions, state: RunState, summary: RunSummary) -> None:
    if opts.cpu_jobs < 0:
        raise ValueError(f"--cpu-jobs {opts.cpu_jobs}: give 0 (in this process) or a number of job processes")
    if opts.gpus or opts.cpu_jobs:
        ProcessQueue(opts, state, summary).run()
    else:
        run_in_process(opts, state, summary)


def conclude(opts: RunOptions, summary: RunSummary, planned: PlannedJob, record: dict, counts: Counts,
             status: StatusLine, log: Path | None = None) -> None:
    """Count a finished job; under --strict the first failure stops the run."""
    summary.ran.append(planned.job.name)
    if record["status"] == "ok":
        counts.done += 1
        return
    counts.failed += 1
    summary.failed[planned.job.name] = record["error"]
    status.say(f"failed: {planned.job.name}: {record['error'].splitlines()[0][:200]}" + (f" (log: {log})" if log else ""))
    if opts.strict:
        raise RuntimeError(f"{planned.job.name} failed (--strict): {record['error']}")


# ---- in this process ------------------------------------------------------------------------------
def run_in_process(opts: RunOptions, state: RunState, summary: RunSummary) -> None:
    todo = [p for p in state.planned if not p.done]
    status = StatusLine(capacity=1, enabled=opts.progress)
    counts = Counts(queued=len(todo))
    held_elsewhere = []
    try:
        for name, method in state.methods.items():
            jobs = [p for p in todo if p.job.method == name]
            if not jobs:
                continue
            prepare_error = prepare(method, state.cohort, context(opts))
            for planned in jobs:
                lock = JobLock(lock_path(opts.out_dir, planned.job.name))
                if lock.try_acquire() and is_done(planned):  # another runner finished it since we planned
                    lock.release()
                    counts.queued, counts.done = counts.queued - 1, counts.done + 1
                elif lock.held:
                    _run_locked(opts, state, summary, planned, prepare_error, lock, counts, status)
                else:
                    held_elsewhere.append((planned, prepare_error, lock))
                    counts.queued, counts.elsewhere = counts.queued - 1, counts.elsewhere + 1
                status.show(counts)
        for planned, prepare_error, lock in held_elsewhere:
            lock.acquire()  # wait for the other runner, then see whether it finished the job
            counts.elsewhere -= 1
            if is_done(planned):
                lock.release()
                counts.done += 1
            else:
                counts.queued += 1
                _run_locked(opts, state, summary, planned, prepare_error, lock, counts, status)
            status.show(counts)
    finally:
        status.close()


def _run_locked(opts: RunOptions, state: RunState, summary: RunSummary, planned: PlannedJob,
                prepare_error: str | None, lock: JobLock, counts: Counts, status: StatusLine) -> None:
    counts.queued, counts.running = counts.queued - 1, counts.running + 1
    status.show(counts)
    started = time.monotonic()
    method = state.methods[planned.job.method]
    try:
        record = run_attempt(opts, state, planned, method, prepare_error)
        # the retry happens here and its record is final, so this record is never a retry's
        retry = retry_overrides_after(record, method, opts.retry_oom, already_retried=False)
        if retry:
            status.say(f"{planned.job.name}: out of GPU memory; retrying once with {retry}")
            record = _retry(opts, state, planned, retry, record)
        store(opts, planned, annotate(record, "in-process", {"launcher": "local", "in_process": True}, retry))
    finally:
        lock.release()
    counts.running -= 1
    status.finished(time.monotonic() - started)
    conclude(opts, summary, planned, record, counts, status)


def _retry(opts: RunOptions, state: RunState, planned: PlannedJob, overrides: dict, first: dict) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give back what the failed attempt held
    try:
        return prepared_attempt(opts, state, planned, overrides)
    except OverridesRefused as err:  # keep the out-of-memory record
        first["error"] += f" (retry with {overrides} impossible: {err})"
        return first


# ---- one process per job --------------------------------------------------------------------------
PENDING = object()  # a method's prepare stage has not finished


@dataclass
class Task:
    kind: str  # "prepare" | "job"
    method: str
    planned: PlannedJob | None = None
    width: int = 1  # GPUs (slots) it needs
    lock: JobLock | None = None
    retry_overrides: dict = field(default_factory=dict)
    spec: JobSpec | None = None
    proc: subprocess.Popen | None = None
    slots: list = field(default_factory=list)
    log: Path | None = None
    log_file: IO | None = None
    started: float = 0.0


class ProcessQueue:
    def __init__(self, opts: RunOptions, state: RunState, summary: RunSummary):
        self.opts, self.state, self.summary = opts, state, summary
        self.gpu_mode = bool(opts.gpus)
        self.slots: list = list(opts.gpus) if self.gpu_mode else [f"cpu{i}" for i in range(opts.cpu_jobs)]
        self.free: list = list(self.slots)
        self.pending: list[Task] = []
        self.running: list[Task] = []
        self.held_elsewhere: list[Task] = []
        self.prepared: dict[str, object] = {}  # method -> PENDING | None (ready) | error message
        self.counts = Counts()
        self.status = StatusLine(capacity=len(self.slots), enabled=opts.progress)
        self._last_recheck = 0.0

    # -- plan ---------------------------------------------------------------------------------------
    def _tasks(self) -> None:
        todo = [p for p in self.state.planned if not p.done]
        jobs = []
        for name, method in self.state.methods.items():
            mine = [p for p in todo if p.job.method == name]
            if not mine:
                continue
            self.prepared[name] = PENDING if has_prepare(method) else None
            if has_prepare(method):
                self.pending.append(Task("prepare", name))
            width = max(1, gpus_per_job(self.opts, method)) if self.gpu_mode else 1
            jobs += [Task("job", name, p, width, JobLock(lock_path(self.opts.out_dir, p.job.name))) for p in mine]
        # the widest jobs first: a multi-GPU job would wait long for its GPUs to be free at once
        self.pending += sorted(jobs, key=lambda t: -t.width)
        self.counts.queued = len(jobs)

    def run(self) -> None:
        self._tasks()
        try:
            while self.pending or self.running or self.held_elsewhere:
                self._start_ready()
                self._reap()
                self._recheck_held()
                self.status.show(self.counts)
                time.sleep(POLL_S)
        except BaseException:  # Ctrl-C, --strict: stop the job processes, keep what is finished
            self._stop_all()
            raise
        finally:
            for task in self.pending + self.running + self.held_elsewhere:
                if task.lock is not None:
                    task.lock.release()
            self.status.close()

    # -- starting -----------------------------------------------------------------------------------
    def _start_ready(self) -> None:
        for task in list(self.pending):
            if not self.free:
                return
            if task.kind == "prepare":
                if not any(t.kind == "prepare" for t in self.running):  # one at a time: shared caches
                    self._start(task, 1)
                continue
            ready = self.prepared[task.method]
            if ready is PENDING or (ready is None and len(self.free) < task.width <= len(self.slots)):
                continue  # its prepare stage, or enough free GPUs, to come
            if not task.lock.try_acquire():
                self.pending.remove(task)
                self.held_elsewhere.append(task)
                self.counts.queued, self.counts.elsewhere = self.counts.queued - 1, self.counts.elsewhere + 1
            elif is_done(task.planned):  # another runner finished it since we planned
                self.pending.remove(task)
                task.lock.release()
                self.counts.queued, self.counts.done = self.counts.queued - 1, self.counts.done + 1
            elif ready is not None:
                self._end_without_process(task, failure_record(task.planned, ready))
            elif task.width > len(self.slots):
                self._end_without_process(task, failure_record(
                    task.planned, f"needs {task.width} GPUs but --gpus gives {len(self.slots)}; give more GPUs or "
                                  f"--gpus-per-job {len(self.slots)}"))
            else:
                self._start(task, task.width)

    def _start(self, task: Task, width: int) -> None:
        self.pending.remove(task)
        task.slots, self.free = self.free[:width], self.free[width:]
        j = task.planned.job if task.planned else None
        if j:
            task.log = Path(self.opts.out_dir) / "logs" / j.dataset / j.task / j.method / f"fold{j.fold}_seed{j.seed}.log"
        else:
            task.log = Path(self.opts.out_dir) / "logs" / self.state.cohort.name / f"prepare_{task.method}.log"
        task.spec = JobSpec(
            kind=task.kind, options=options_to_dict(self._worker_options()), method=task.method,
            job=j.__dict__ if j else None, config_hash=task.planned.config_hash if task.planned else None,
            nprocs=width if self.gpu_mode else 1, retry_overrides=task.retry_overrides,
            launch={"launcher": "local", "gpus": task.slots if self.gpu_mode else [], "log": str(task.log)})
        task.log.parent.mkdir(parents=True, exist_ok=True)
        task.log_file = open(task.log, "a")
        task.log_file.write(f"=== attempt {task.spec.attempt} on {'GPUs ' + str(task.slots) if self.gpu_mode else 'CPU'}"
                            f"{' with ' + str(task.retry_overrides) if task.retry_overrides else ''}\n")
        task.log_file.flush()
        task.proc = subprocess.Popen([sys.executable, "-m", "benchmark.launchers.worker", task.spec.to_json()],
                                     cwd=REPO_ROOT, env=self._env(task.slots), stdin=subprocess.DEVNULL,
                                     stdout=task.log_file, stderr=subprocess.STDOUT, start_new_session=True)
        task.started = time.monotonic()
        self.running.append(task)
        if task.kind == "prepare":
            self.status.say(f"preparing {task.method} (feature extraction / slide products; log: {task.log})")
        else:
            self.counts.queued, self.counts.running = self.counts.queued - 1, self.counts.running + 1

    def _worker_options(self) -> RunOptions:
        return replace(self.opts, progress=False)  # progress bars would fill the job logs

    def _env(self, slots: list) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(slots) if self.gpu_mode else ""
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(self.slots))))
        env[PARENT_ENV] = str(os.getpid())
        return env

    # -- ending -------------------------------------------------------------------------------------
    def _reap(self) -> None:
        for task in list(self.running):
            code = task.proc.poll()
            if code is None:
                continue
            self.running.remove(task)
            self.free = [s for s in self.slots if s in self.free or s in task.slots]
            task.log_file.close()
            if task.kind == "prepare":
                self._prepare_ended(task, code)
            else:
                self.counts.running -= 1
                self._job_ended(task, code)

    def _prepare_ended(self, task: Task, code: int) -> None:
        path = prepare_status_path(self.opts, self.state.cohort.name, task.method)
        status = read_result(path) if path.exists() else {}
        if status.get("attempt") != task.spec.attempt:
            status = {"status": "failed", "error": f"prepare process exited with code {code}; see {task.log}"}
        self.prepared[task.method] = None if status["status"] == "ok" else status["error"]

    def _job_ended(self, task: Task, code: int) -> None:
        record = attempt_record(task.planned.path, task.spec.attempt)
        if record is None:
            record = annotate(failure_record(task.planned, f"job process exited with code {code} without a result "
                                                           f"(killed, crashed, or out of host memory?); see {task.log}"),
                              task.spec.attempt, task.spec.launch, task.retry_overrides)
            store(self.opts, task.planned, record)
        retry = retry_overrides_after(record, self.state.methods[task.method], self.opts.retry_oom,
                                      already_retried=bool(task.retry_overrides))
        if retry:
            self.status.say(f"{task.planned.job.name}: out of GPU memory; retrying once with {retry}")
            self.pending.insert(0, Task("job", task.method, task.planned, task.width, task.lock, retry))
            self.counts.queued += 1
            return
        task.lock.release()
        self.status.finished(time.monotonic() - task.started)
        conclude(self.opts, self.summary, task.planned, record, self.counts, self.status, task.log)

    def _end_without_process(self, task: Task, record: dict) -> None:
        self.pending.remove(task)
        self.counts.queued -= 1
        store(self.opts, task.planned, record)
        task.lock.release()
        conclude(self.opts, self.summary, task.planned, record, self.counts, self.status)

    def _recheck_held(self) -> None:
        """Jobs another runner held: once its lock is free, done (skip) or not (run it here)."""
        if not self.held_elsewhere or time.monotonic() - self._last_recheck < 1.0:
            return
        self._last_recheck = time.monotonic()
        for task in list(self.held_elsewhere):
            if not task.lock.try_acquire():
                continue
            self.held_elsewhere.remove(task)
            self.counts.elsewhere -= 1
            if is_done(task.planned):
                task.lock.release()
                self.counts.done += 1
            else:
                self.pending.insert(0, task)
                self.counts.queued += 1

    def _stop_all(self) -> None:
        """SIGTERM to every job process group (torchrun ranks included), SIGKILL after a grace period."""
        for task in self.running:
            _signal_group(task.proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for task in self.running:
            try:
                task.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(task.proc, signal.SIGKILL)
                task.proc.wait()
            task.log_file.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
