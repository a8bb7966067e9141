"""Per-job locks, so that two runners on one output folder never run the same job at the same time.

A lock is an `fcntl.flock` on `<out>/locks/<job>.lock`. The kernel drops it when the process that holds
it dies (SIGKILL included), so a crashed runner never leaves a stale lock behind. On NFS, flock is
emulated with POSIX byte-range locks (Linux >= 2.6.12, NFSv4), which other clients see too.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


def lock_path(out_dir: Path, job_name: str) -> Path:
    return Path(out_dir) / "locks" / (job_name.replace("/", "__") + ".lock")


class JobLock:
    """A non-blocking exclusive lock on one job. `try_acquire()` says whether this runner got it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename} pid {os.getpid()}\n".encode())  # who holds it, for a curious user
        self._fd = fd
        return True

    def acquire(self, poll_s: float = 0.5) -> None:
        """Wait until the lock is free (polling, so that Ctrl-C still works)."""
        while not self.try_acquire():
            time.sleep(poll_s)

    def release(self) -> None:
        if self._fd is None:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "JobLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
