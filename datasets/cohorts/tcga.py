"""TCGA cohorts `tcga_<cohort>`: the user's diagnostic slides, the shipped PORPOISE survival tables and
5-fold splits, and AJCC (FIGO for UCEC) early/late stage from TCGA-CDR.

Tasks: `survival` (overall survival in months; default splits: PORPOISE's published 5 folds, restricted
to the patients whose slides are on disk) and `stage` (0 = early, stage I-II; 1 = late, III-IV;
generated splits). GBMLGG has no stage (gliomas are graded, not staged) and refuses that task.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from benchmark.registry import DATASETS
from datasets.cohorts.base import Cohort, Task
from datasets.cohorts.discovery import find_slides, match_slides

TABLES = Path(__file__).resolve().parents[1] / "tables"
TCGA_COHORTS = ("blca", "brca", "coadread", "gbmlgg", "hnsc", "kirc", "kirp", "lihc", "luad", "lusc",
                "paad", "skcm", "stad", "ucec")
# which TCGA-CDR column stages each cohort: AJCC pathologic stage; UCEC is staged by FIGO (its
# `clinical_stage`, AJCC is "[Not Applicable]"); GBMLGG is not staged
STAGE_COLUMN = {c: "ajcc_pathologic_tumor_stage" for c in TCGA_COHORTS} | {"ucec": "clinical_stage", "gbmlgg": None}
NO_STAGE = ("tcga_gbmlgg has no stage task: gliomas are graded, not staged (TCGA-CDR has no AJCC stage for "
            "GBM/LGG); use --task survival")
PORPOISE = "PORPOISE 5-fold splits (Chen et al., Cancer Cell 2022)"

SURVIVAL = Task("survival", "survival", 4, (), "overall survival (months), 4 discrete-time bins")
STAGE = Task("stage", "classification", 2, ("early (I-II)", "late (III-IV)"), "AJCC stage, early vs late")
STAGE_FIGO = Task("stage", "classification", 2, ("early (I-II)", "late (III-IV)"), "FIGO stage, early vs late")

_STAGE = re.compile(r"Stage (IV|III|II|I)(?:[A-C]\d?)?")  # Stage I, IIA, IIIC1, IVB, ...
EARLY_LATE = {"I": 0, "II": 0, "III": 1, "IV": 1}


@dataclass
class TcgaCohort(Cohort):
    """A cohort that refuses some tasks with a reason (GBMLGG's stage)."""

    refused_tasks: dict[str, str] = field(default_factory=dict)

    def task(self, name: str | None = None) -> Task:
        if name in self.refused_tasks:
            raise ValueError(self.refused_tasks[name])
        return super().task(name)


def survival_table(cohort: str) -> pd.DataFrame:
    """The shipped PORPOISE table of `cohort`: one row per diagnostic slide (case_id, slide_id,
    survival_months, censorship = 1 when alive at last follow-up, ...)."""
    if cohort not in TCGA_COHORTS:
        raise ValueError(f"no shipped TCGA table for '{cohort}'; cohorts: {', '.join(TCGA_COHORTS)}")
    return pd.read_csv(TABLES / "tcga" / f"{cohort}_survival.csv", dtype={"case_id": str, "slide_id": str})


def survival_labels(table: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: patient_id, time (months), event (1 = death observed)."""
    patients = table.drop_duplicates("case_id").sort_values("case_id")
    return pd.DataFrame({
        "patient_id": patients["case_id"].to_numpy(),
        "time": patients["survival_months"].astype(float).to_numpy(),
        "event": (1 - patients["censorship"].astype(int)).to_numpy(),
    })


def stage_to_class(text: str) -> int | None:
    """0 for stage I-II, 1 for III-IV, None for anything else (not available, discrepancy, Stage X,
    Stage 0 in situ, ...). "I/II NOS" (stage I or II, not further specified) is early either way."""
    text = str(text).strip()
    if text == "I/II NOS":
        return 0
    match = _STAGE.fullmatch(text)
    return EARLY_LATE[match.group(1)] if match else None


def stage_labels(cohort: str, patients: list[str]) -> tuple[pd.DataFrame, Counter]:
    """Early/late stage of `patients` from TCGA-CDR, and the unusable stage strings dropped (counted)."""
    column = STAGE_COLUMN[cohort]
    if column is None:
        raise ValueError(NO_STAGE)
    clinical = pd.read_csv(TABLES / "tcga" / "clinical_stage.csv", dtype=str).set_index("bcr_patient_barcode")
    strings = clinical[column].reindex(patients).fillna("[not in TCGA-CDR]")
    classes = strings.map(stage_to_class)
    dropped = Counter(strings[classes.isna()])
    labels = pd.DataFrame({"patient_id": classes.dropna().index, "label": classes.dropna().astype(int).to_numpy()})
    return labels.reset_index(drop=True), dropped


def load_tcga(cohort: str, data_root: Path | None, cache_dir: Path, seed: int = 0, splits: str = "default") -> Cohort:
    """The `tcga_<cohort>` dataset: slides found under `data_root`, matched to the shipped table."""
    from datasets.splits import check_splits_option, describe_splits, make_split_provider

    name = f"tcga_{cohort}"
    if data_root is None:
        raise ValueError(f"{name} needs --data-root: the folder with your TCGA-{cohort.upper()} diagnostic slides "
                         "(GDC download layout or flat)")
    check_splits_option(splits)
    table = survival_table(cohort)
    expected = table.rename(columns={"case_id": "patient_id"})[["slide_id", "patient_id"]]
    coverage = match_slides(find_slides(data_root), expected, data_root)
    if coverage.matched.empty:
        raise FileNotFoundError(
            f"none of the {len(expected)} TCGA-{cohort.upper()} diagnostic slides of the shipped table is under "
            f"{data_root} ({coverage.n_found} slide files scanned); slides are matched by file name, e.g. "
            f"{expected['slide_id'].iloc[0]}.svs"
        )
    survival = survival_labels(table)
    labels, tasks, notes = {"survival": survival}, {"survival": SURVIVAL}, coverage.lines(name, len(survival))
    refused = {}
    if STAGE_COLUMN[cohort] is None:
        refused["stage"] = NO_STAGE
    else:
        labels["stage"], dropped = stage_labels(cohort, survival["patient_id"].tolist())
        tasks["stage"] = STAGE_FIGO if cohort == "ucec" else STAGE
        notes.append(stage_note(labels["stage"], dropped, set(coverage.matched["patient_id"])))
    shipped = {"survival": (TABLES / "splits" / "porpoise" / cohort, PORPOISE)}
    result = TcgaCohort(
        name=name,
        slides=coverage.matched,
        labels=labels,
        tasks=tasks,
        default_task="survival",
        protocol=describe_splits(splits, shipped, list(tasks)),
        notes=notes,
        refused_tasks=refused,
        tissue_preset="tcga",
    )
    result.split_provider = make_split_provider(result, splits, shipped=shipped)
    return result


def stage_note(labels: pd.DataFrame, dropped: Counter, with_slides: set[str]) -> str:
    counts = labels["label"].value_counts()
    usable = labels["patient_id"].isin(with_slides).sum()
    text = (f"stage: {len(labels)} patients labelled (early {counts.get(0, 0)}, late {counts.get(1, 0)}; "
            f"{usable} with slides)")
    if dropped:
        text += f", {sum(dropped.values())} dropped for unusable stage (" + ", ".join(
            f"{s}: {n}" for s, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))) + ")"
    return text


for _cohort in TCGA_COHORTS:
    _stage = {"gbmlgg": "no stage (not staged)", "ucec": "stage (FIGO early/late)"}.get(_cohort, "stage (AJCC early/late)")
    DATASETS.add(
        f"tcga_{_cohort}",
        partial(load_tcga, _cohort),
        f"TCGA-{_cohort.upper()} diagnostic slides (--data-root): survival (PORPOISE 5-fold splits), {_stage}",
    )
