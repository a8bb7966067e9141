"""The live status line of a run: done / running / failed / queued, elapsed time and an estimate.

On a terminal it is one line redrawn in place; in a log file (not a terminal) it is a new line each
time a count changes, so that the log stays short."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Counts:
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    elsewhere: int = 0  # held by another runner on the same output folder


@dataclass
class StatusLine:
    capacity: int  # jobs that can run at once
    enabled: bool = True
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.monotonic)
    durations: list[float] = field(default_factory=list)
    _last: str = ""

    def finished(self, seconds: float) -> None:
        """A job ended after `seconds` (feeds the estimate)."""
        self.durations.append(seconds)

    def text(self, counts: Counts) -> str:
        parts = [f"{counts.done} done", f"{counts.failed} failed", f"{counts.running} running", f"{counts.queued} queued"]
        if counts.elsewhere:
            parts.append(f"{counts.elsewhere} held by another runner")
        line = "jobs: " + ", ".join(parts) + f" | {clock(time.monotonic() - self.started)} elapsed"
        left = counts.queued + counts.running + counts.elsewhere
        if self.durations and left:
            mean = sum(self.durations) / len(self.durations)
            line += f" | about {clock(mean * left / max(1, min(self.capacity, left)))} left"
        return line

    def show(self, counts: Counts) -> None:
        if not self.enabled:
            return
        line = self.text(counts)
        if self.stream.isatty():
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif line.split(" | ")[0] != self._last.split(" | ")[0]:  # counts changed
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last = line

    def say(self, message: str) -> None:
        """A message on its own line (above the status line on a terminal)."""
        if not self.enabled:
            return
        if self.stream.isatty() and self._last:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        if self.stream.isatty() and self._last:
            self.stream.write(self._last)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.stream.isatty() and self._last:
            self.stream.write("\n")
            self.stream.flush()
