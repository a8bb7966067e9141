"""The per-cohort record of slides that could not be used: slide_id, stage, reason (a CSV file).

Several methods prepare the same cohort and write the same file, so records already in the file are
kept and merged (one record per slide and stage, the latest reason wins); a stage that later succeeds
is taken off again. Delete the file to start over.
"""
from __future__ import annotations

import csv
from pathlib import Path

from datasets.cache import atomic_path

COLUMNS = ("slide_id", "stage", "reason")


class Quarantine:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self._records: dict[tuple[str, str], dict] = {}
        if self.path is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    self.add(row["slide_id"], row["stage"], row["reason"])

    def add(self, slide_id: str, stage: str, reason: str) -> None:
        record = {"slide_id": str(slide_id), "stage": str(stage), "reason": " ".join(str(reason).split())}
        self._records[(record["slide_id"], record["stage"])] = record

    def discard(self, slide_id: str, stages) -> None:
        """Forget records of `slide_id` at these stages (they have since succeeded)."""
        for stage in stages:
            self._records.pop((str(slide_id), stage), None)

    @property
    def records(self) -> list[dict]:
        return list(self._records.values())

    @property
    def slide_ids(self) -> set[str]:
        return {slide_id for slide_id, _ in self._records}

    def __len__(self) -> int:
        return len(self.slide_ids)

    def write(self) -> Path | None:
        """Write the CSV atomically (no-op without a path)."""
        if self.path is None:
            return None
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(sorted(self.records, key=lambda r: (r["slide_id"], r["stage"])))
        return self.path
