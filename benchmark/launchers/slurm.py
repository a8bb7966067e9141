"""The SLURM launcher (`--launcher slurm`): the plan's jobs as SLURM job arrays, through submitit.

- Each method's prepare stage (feature extraction) runs first, as one array over the methods that
  have one; then one array per job width: per-fold jobs of one GPU, multi-GPU jobs as multi-task
  jobs (one task per GPU, torch.distributed across the tasks).
- Logs: `<out>/slurm_logs/<job id>_<task>_log.out|err`, printed at submission.
- A job that is preempted, or that nears its time limit (SLURM sends SIGUSR2 90 s before), is
  requeued by submitit (`SlurmTask` is Checkpointable) and resumes from its per-epoch training state.
- The job's lock is taken where the job runs, so that another runner (or a rerun after this one
  was killed) never runs it twice; such a job ends at once with outcome 'held' and is checked
  again when the lock is free.
This process waits for every job, shows the status line, and writes a failure result for a job
that ended without one (node failure, cancelled, killed for memory).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from benchmark.jobs import PlannedJob
from benchmark.launchers.execution import (REPO_ROOT, JobSpec, annotate, attempt_record, execute_spec,
                                           failure_record, gpus_per_job, has_prepare, is_done, options_to_dict,
                                           prepare_status_path, retry_overrides_after, store)
from benchmark.launchers.local import conclude
from benchmark.launchers.progress import Counts, StatusLine
from benchmark.locks import JobLock, lock_path
from benchmark.results import atomic_write_text, read_result
from benchmark.runner import RunOptions, RunState, RunSummary

POLL_S = 2.0
LOST_GRACE_S = 10.0  # a job gone from the queue may still be flushing its outcome file
ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def outcome_path(out_dir: Path, attempt: str) -> Path:
    return Path(out_dir) / "work" / "slurm_outcomes" / f"{attempt}.json"


class SlurmTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in each SLURM task. Checkpointable: on preemption or near the time
    limit submitit calls `checkpoint()` and requeues the same spec; the job then resumes from the
    training state in its job folder (benchmark.checkpoint)."""

    def __init__(self, spec_json: str):
        self.spec_json = spec_json

    def __call__(self) -> str:
        spec = JobSpec.from_json(self.spec_json)
        env = submitit.JobEnvironment()
        spec.launch.update(slurm_job=env.job_id, log=str(env.paths.stdout).replace("%t", "0"))
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        outcome = execute_spec(spec)
        if env.global_rank == 0:
            atomic_write_text(outcome_path(spec.run_options().out_dir, spec.attempt), json.dumps({"outcome": outcome}))
        return outcome

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def time_minutes(text: str) -> int:
    """A SLURM time limit ('MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM', 'D-HH:MM:SS') in whole minutes."""
    try:
        days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
        parts = [int(p) for p in rest.split(":")]
        if "-" in text:  # D-HH[:MM[:SS]]
            hours, minutes, seconds = (parts + [0, 0])[:3]
        else:  # MM | MM:SS | HH:MM:SS
            hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
        total = int(days) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    except (ValueError, KeyError):
        raise ValueError(f"--time {text}: expected a SLURM time such as 30, 4:00:00 or 1-12:00:00") from None
    if total < 1:
        raise ValueError(f"--time {text}: must be at least one minute")
    return total


def partition_time_limit(partition: str | None) -> int:
    """The partition's own time limit (minutes) when --time is not given; 24 h where it has none."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P %l"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, limit = line.split()
        if (partition is None and name.endswith("*")) or name.rstrip("*") == partition:
            return 24 * 60 if limit in ("infinite", "UNLIMITED", "n/a") else time_minutes(limit)
    raise ValueError(f"partition {partition or '(default)'} not found by sinfo; give --partition (see `sinfo`)")


def sbatch_parameters(flags: list[str]) -> dict:
    """--sbatch-flag KEY=VALUE / --key=value / --flag -> submitit's additional_parameters."""
    params = {}
    for flag in flags:
        key, sep, value = flag.lstrip("-").partition("=")
        if not key:
            raise ValueError(f"--sbatch-flag {flag}: expected KEY=VALUE (e.g. qos=high) or a bare sbatch flag")
        params[key.replace("-", "_")] = value if sep else True
    return params


@dataclass
class Submitted:
    spec: JobSpec
    job: object  # submitit.Job
    planned: PlannedJob | None
    width: int
    gone_since: float | None = None


class SlurmQueue:
    def __init__(self, opts: RunOptions, state: RunState, summary: RunSummary):
        if shutil.which("sbatch") is None:
            raise ValueError("--launcher slurm: `sbatch` is not on PATH; run on a SLURM login node or use --launcher local")
        self.opts, self.state, self.summary = opts, state, summary
        self.folder = Path(opts.out_dir).resolve() / "slurm_logs"
        self.minutes = time_minutes(opts.time) if opts.time else partition_time_limit(opts.partition)
        self.active: list[Submitted] = []
        self.held_elsewhere: list[tuple[PlannedJob, int, dict]] = []
        self.prepare_errors: dict[str, str | None] = {}
        self.counts = Counts()
        self.status = StatusLine(capacity=256, enabled=opts.progress)
        self._states: dict[str, str] = {}

    # -- submission ---------------------------------------------------------------------------------
    def _executor(self, width: int):
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=3)
        on_gpu = self.opts.device.startswith("cuda")
        params = dict(job_name="wsi-bench", time=self.minutes, ntasks_per_node=width, nodes=1,
                      setup=[f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
                      additional_parameters=sbatch_parameters(self.opts.sbatch_flags))
        if on_gpu:
            params["gpus_per_node"] = width
        if width > 1:
            params["srun_args"] = ["--kill-on-bad-exit=1"]  # one failed rank ends the job
        for key in ("partition", "account"):
            if getattr(self.opts, key):
                params[key] = getattr(self.opts, key)
        executor.update_parameters(**params)
        return executor

    def _spec(self, kind: str, method: str, planned: PlannedJob | None, width: int, retry: dict) -> JobSpec:
        return JobSpec(kind=kind, options=options_to_dict(self.opts), method=method,
                       job=planned.job.__dict__ if planned else None,
                       config_hash=planned.config_hash if planned else None, nprocs=width, retry_overrides=retry,
                       launch={"launcher": "slurm"}, lock_here=kind == "job")

    def _submit(self, items: list[tuple[str, str, PlannedJob | None, int, dict]]) -> None:
        """items: (kind, method, planned, width, retry overrides); one array per width."""
        for width in sorted({item[3] for item in items}, reverse=True):
            group = [item for item in items if item[3] == width]
            specs = [self._spec(kind, method, planned, width, retry) for kind, method, planned, _, retry in group]
            executor = self._executor(width)
            with executor.batch():
                jobs = [executor.submit(SlurmTask(spec.to_json())) for spec in specs]
            for spec, job, (_, _, planned, _, _) in zip(specs, jobs, group):
                self.active.append(Submitted(spec, job, planned, width))
            first = jobs[0].job_id.split("_")[0]
            what = "prepare job(s)" if group[0][0] == "prepare" else f"job(s) of {width} task(s)"
            self.status.say(f"slurm: submitted {len(jobs)} {what} as SLURM job {first}; "
                            f"logs: {self.folder}/{first}_*_log.out and .err")

    # -- waiting ------------------------------------------------------------------------------------
    def _queue_states(self) -> dict[str, str] | None:
        """SLURM state per job id ('123_4' for array tasks); None when squeue could not answer."""
        ids = sorted({s.job.job_id.split("_")[0] for s in self.active})
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            # every job aged out of the controller (they ended), or the controller is busy: ask again
            return {} if "invalid job id" in out.stderr.lower() else None
        return dict(line.split("|", 1) for line in out.stdout.split())

    def _wait(self) -> None:
        while self.active:
            time.sleep(POLL_S)
            states = self._queue_states()
            if states is None:
                continue
            self._states = states
            for sub in list(self.active):
                state = self._states.get(sub.job.job_id)
                if state is not None and state not in ENDED and not self._has_outcome(sub):
                    continue
                if not self._has_outcome(sub):
                    sub.gone_since = sub.gone_since or time.monotonic()
                    if time.monotonic() - sub.gone_since < LOST_GRACE_S:
                        continue
                self.active.remove(sub)
                self._ended(sub, state or "gone from the queue")
            self._show()

    def _has_outcome(self, sub: Submitted) -> bool:
        if sub.spec.kind == "prepare":
            path = prepare_status_path(self.opts, self.state.cohort.name, sub.spec.method)
            return path.exists() and read_result(path).get("attempt") == sub.spec.attempt
        return outcome_path(self.opts.out_dir, sub.spec.attempt).exists()

    def _log(self, sub: Submitted) -> str:
        return str(sub.job.paths.stdout).replace("%t", "0")

    def _ended(self, sub: Submitted, state: str) -> None:
        if sub.spec.kind == "prepare":
            return self._prepare_ended(sub, state)
        outcome = json.loads(outcome_path(self.opts.out_dir, sub.spec.attempt).read_text())["outcome"] \
            if self._has_outcome(sub) else None
        planned = sub.planned
        if outcome == "done":
            self.counts.done += 1
            return
        if outcome == "held":
            self.held_elsewhere.append((planned, sub.width, sub.spec.retry_overrides))
            return
        record = attempt_record(planned.path, sub.spec.attempt)
        if record is None:
            record = annotate(failure_record(planned, f"slurm job {sub.job.job_id} ended ({state}) without a result; "
                                                      f"see {self._log(sub)}"),
                              sub.spec.attempt, sub.spec.launch, sub.spec.retry_overrides)
            with JobLock(lock_path(self.opts.out_dir, planned.job.name)):
                if not is_done(planned):
                    store(self.opts, planned, record)
        retry = retry_overrides_after(record, self.state.methods[planned.job.method], self.opts.retry_oom,
                                      already_retried=bool(sub.spec.retry_overrides))
        if retry:
            self.status.say(f"{planned.job.name}: out of GPU memory; resubmitting once with {retry}")
            self._submit([("job", planned.job.method, planned, sub.width, retry)])
            return
        conclude(self.opts, self.summary, planned, record, self.counts, self.status, Path(self._log(sub)))

    def _prepare_ended(self, sub: Submitted, state: str) -> None:
        path = prepare_status_path(self.opts, self.state.cohort.name, sub.spec.method)
        status = read_result(path) if self._has_outcome(sub) else {
            "status": "failed", "error": f"prepare job {sub.job.job_id} ended ({state}); see {self._log(sub)}"}
        self.prepare_errors[sub.spec.method] = status.get("error")

    def _show(self) -> None:
        running = sum(1 for s in self.active if s.spec.kind == "job" and self._states.get(s.job.job_id) == "RUNNING")
        self.counts.running = running
        self.counts.queued = sum(1 for s in self.active if s.spec.kind == "job") - running
        self.counts.elsewhere = len(self.held_elsewhere)
        self.status.show(self.counts)

    # -- the run --------------------------------------------------------------------------------------
    def run(self) -> None:
        todo = [p for p in self.state.planned if not p.done]
        methods = [name for name in self.state.methods if any(p.job.method == name for p in todo)]
        try:
            preparing = [name for name in methods if has_prepare(self.state.methods[name])]
            if preparing:
                self._submit([("prepare", name, None, 1, {}) for name in preparing])
                self._wait()
            jobs = []
            for planned in todo:
                error = self.prepare_errors.get(planned.job.method)
                if error:
                    with JobLock(lock_path(self.opts.out_dir, planned.job.name)):
                        if not is_done(planned):
                            record = failure_record(planned, error)
                            store(self.opts, planned, record)
                            conclude(self.opts, self.summary, planned, record, self.counts, self.status)
                    continue
                width = max(1, gpus_per_job(self.opts, self.state.methods[planned.job.method]))
                jobs.append(("job", planned.job.method, planned, width, {}))
            if jobs:
                self._submit(jobs)
            self._wait()
            while self.held_elsewhere:  # jobs another runner held: wait for its lock, then run what is left
                planned, width, retry = self.held_elsewhere.pop(0)
                with JobLock(lock_path(self.opts.out_dir, planned.job.name)):
                    if is_done(planned):
                        self.counts.done += 1
                        continue
                self._submit([("job", planned.job.method, planned, width, retry)])
                self._wait()
        except BaseException:  # Ctrl-C, --strict: cancel what this runner submitted
            ids = sorted({s.job.job_id.split("_")[0] for s in self.active})
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True)
            raise
        finally:
            self.status.close()


def launch_slurm(opts: RunOptions, state: RunState, summary: RunSummary) -> None:
    SlurmQueue(opts, state, summary).run()
