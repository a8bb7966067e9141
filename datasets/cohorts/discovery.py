"""Finding a user's slides on disk and matching them to a shipped label table.

`--data-root` is scanned recursively, so the GDC download layout (`<file uuid>/<slide_id>.svs`), the
CAMELYON16 release layout (`training/normal`, `training/tumor`, `testing/images`) and flat folders all
work: a slide is matched by its file stem. What did not match is reported, not fatal: the run goes on
with the slides that are there, and the coverage report goes into the cohort's notes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

# formats OpenSlide reads (a .tif/.tiff may also be a plain image: the slide stage quarantines those)
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")


def is_slide_file(path: Path) -> bool:
    """A slide by its name: a slide extension (so partial downloads, `*.partial`, are not), not hidden
    (macOS `._` files), not a mask (`*_mask.tif`, as CAMELYON16 mirrors ship beside the slides)."""
    name = path.name
    return (
        path.suffix.lower() in SLIDE_EXTENSIONS
        and not name.startswith(".")
        and not path.stem.lower().endswith("_mask")
    )


def find_slides(root: Path) -> pd.DataFrame:
    """Every slide file under `root` (recursively, following links): columns slide_id (file stem), path.

    Sorted by path, so that when two files share a stem the choice below is deterministic."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} is not a directory; point it at the folder that holds your slides")
    rows = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(folder) / name
            if is_slide_file(path):
                rows.append({"slide_id": path.stem, "path": str(path.resolve())})
    return pd.DataFrame(rows, columns=["slide_id", "path"]).sort_values("path", ignore_index=True)


@dataclass
class Coverage:
    """What matched and what did not, between the slides on disk and a label table."""

    root: Path
    n_found: int
    matched: pd.DataFrame  # slide_id, patient_id, path
    patients_without_slides: list[str]
    unlabelled_slides: list[str]  # file stems with no row in the label table
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # slide_id -> the paths not used
    renamed: dict[str, str] = field(default_factory=dict)  # stem on disk -> slide_id it stands for
    excluded: dict[str, str] = field(default_factory=dict)  # stem on disk -> why it is left out

    def lines(self, cohort: str, n_labelled: int) -> list[str]:
        """The coverage report, one line per fact, for `Cohort.notes` and the leaderboard footer."""
        patients = self.matched["patient_id"].nunique()
        out = [
            f"{cohort}: {len(self.matched)} slides of {patients} of the {n_labelled} labelled patients found "
            f"under {self.root} ({self.n_found} slide files scanned)"
        ]
        if self.patients_without_slides:
            out.append(f"{len(self.patients_without_slides)} labelled patients have no slide: {_some(self.patients_without_slides)}")
        if self.unlabelled_slides:
            out.append(f"{len(self.unlabelled_slides)} slide files have no label and are not used: {_some(self.unlabelled_slides)}")
        for stem, slide_id in self.renamed.items():
            out.append(f"{stem} is used as {slide_id} (renamed in the official release)")
        for stem, why in self.excluded.items():
            out.append(f"{stem} is left out: {why}")
        for slide_id, paths in self.duplicates.items():
            out.append(f"{slide_id} is on disk {len(paths) + 1} times; using the first by path, ignoring {', '.join(paths)}")
        return out


def match_slides(
    found: pd.DataFrame,
    expected: pd.DataFrame,
    root: Path,
    *,
    key: Callable[[str], str] = str,
    renamed: Mapping[str, str] | None = None,
    excluded: Mapping[str, str] | None = None,
) -> Coverage:
    """Match found slides to `expected` (slide_id, patient_id) by file stem.

    key: normalises both sides before comparing (e.g. `str.lower` for CAMELYON16's names).
    renamed: stem on disk -> slide_id it stands for, used only when that slide_id is not also on disk.
    excluded: stem -> reason, for slides that must not be used although their file exists."""
    renamed = {key(k): v for k, v in (renamed or {}).items()}
    excluded = {key(k): v for k, v in (excluded or {}).items()}
    by_key = {key(s): s for s in expected["slide_id"]}
    on_disk = {key(s) for s in found["slide_id"]}
    chosen: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    report_renamed, report_excluded, unlabelled = {}, {}, []
    for stem, path in zip(found["slide_id"], found["path"]):
        k = key(stem)
        if k in excluded:
            report_excluded[stem] = excluded[k]
            continue
        if k in renamed and key(renamed[k]) not in on_disk:
            report_renamed[stem] = renamed[k]
            k = key(renamed[k])
        if k not in by_key:
            unlabelled.append(stem)
            continue
        slide_id = by_key[k]
        if slide_id in chosen:
            duplicates.setdefault(slide_id, []).append(path)
            continue
        chosen[slide_id] = path
    matched = expected[expected["slide_id"].isin(chosen)][["slide_id", "patient_id"]].copy()
    matched["path"] = matched["slide_id"].map(chosen)
    matched = matched.sort_values("slide_id", ignore_index=True)
    missing = sorted(set(expected["patient_id"]) - set(matched["patient_id"]))
    return Coverage(Path(root), len(found), matched, missing, sorted(unlabelled), duplicates,
                    report_renamed, report_excluded)


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")
