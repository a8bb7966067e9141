"""Leaderboards from result files alone: one Markdown table (mean +- std over folds) and one CSV of
per-fold numbers per (dataset, task)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.metrics import metric_names
from benchmark.results import atomic_write_text, iter_results

METRIC_TITLES = {"auc": "AUC", "accuracy": "ACC", "balanced_accuracy": "Balanced ACC", "macro_f1": "Macro-F1",
                 "c_index": "C-index"}


def plan_path(out_dir: Path, dataset: str, task: str) -> Path:
    return Path(out_dir) / "results" / dataset / task / "plan.json"


def record_plan(out_dir: Path, planned) -> None:
    """Remember which jobs were asked for, so the leaderboard can name the ones that are missing."""
    by_table: dict[tuple[str, str], set[str]] = {}
    for p in planned:
        by_table.setdefault((p.job.dataset, p.job.task), set()).add(f"{p.job.method}|{p.job.fold}|{p.job.seed}")
    for (dataset, task), jobs in by_table.items():
        path = plan_path(out_dir, dataset, task)
        known = set(json.loads(path.read_text())) if path.exists() else set()
        atomic_write_text(path, json.dumps(sorted(known | jobs), indent=0))


def fold_table(records: list[dict]) -> pd.DataFrame:
    """One row per job record: identity, status, metrics, weights and slide counts."""
    rows = []
    for r in records:
        job = r["job"]
        row = {"dataset": job["dataset"], "task": job["task"], "method": job["method"], "fold": job["fold"],
               "seed": job["seed"], "status": r["status"], "error": r.get("error", ""),
               "weights": r.get("weights", ""), "missing_slides": len(r.get("missing_slides", [])),
               "partition": r.get("reported_partition", ""), "protocol": r.get("protocol", ""),
               "n_folds": r.get("config", {}).get("n_folds"), "git_commit": r.get("git_commit", ""),
               "finished_at": r.get("finished_at", "")}
        preds = [p for p in r.get("predictions", []) if p.get("partition") == row["partition"]]
        row["n_patients"] = len(preds)
        row.update({k: (np.nan if v is None else v) for k, v in r.get("metrics", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(folds: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Mean and sample std over folds (each fold first averaged over seeds), per method."""
    ok = folds[folds["status"] == "ok"]
    per_fold = ok.groupby(["method", "fold"])[list(metrics)].mean()
    stats = per_fold.groupby("method").agg(["mean", "std", "count"])
    return stats.sort_values((metrics[0], "mean"), ascending=False)


def fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.4f} ± {0.0 if np.isnan(std) else std:.4f}"


def render(dataset: str, task: str, folds: pd.DataFrame, planned: set[str]) -> tuple[str, pd.DataFrame]:
    kind = "survival" if "c_index" in folds.columns and folds["c_index"].notna().any() else "classification"
    metrics = metric_names(kind)
    for m in metrics:
        if m not in folds.columns:
            folds[m] = np.nan
    stats = summarise(folds, metrics)
    notes: list[str] = []
    rows = []
    for method in stats.index:
        mine = folds[folds["method"] == method]
        mark = ""
        if (mine["weights"] == "random").any():
            notes.append(f"{method}: pretrained encoder replaced by random weights (--weights random); "
                         "not comparable to published numbers.")
            mark += f"[^{len(notes)}]"
        missing = int(mine.loc[mine["status"] == "ok", "missing_slides"].max() or 0)
        if missing:
            notes.append(f"{method}: {missing} slides missing (quarantined or not found); see the quarantine report.")
            mark += f"[^{len(notes)}]"
        n_pat = mine.loc[mine["status"] == "ok", "n_patients"]
        rows.append([method + mark, *[fmt(stats.loc[method, (m, "mean")], stats.loc[method, (m, "std")]) for m in metrics],
                     int(stats.loc[method, (metrics[0], "count")]), int(n_pat.sum())])
    for _, r in folds[folds["status"] != "ok"].iterrows():
        notes.append(f"{r['method']} fold {r['fold']} seed {r['seed']} failed: {str(r['error']).splitlines()[0][:200]}")
    done = {f"{r.method}|{r.fold}|{r.seed}" for r in folds[folds["status"] == "ok"].itertuples()}
    failed = {f"{r.method}|{r.fold}|{r.seed}" for r in folds[folds["status"] != "ok"].itertuples()}
    for key in sorted(planned - done - failed):
        method, fold, seed = key.split("|")
        notes.append(f"{method} fold {fold} seed {seed}: no result yet (not run or interrupted).")
    headers = ["Method", *[METRIC_TITLES[m] for m in metrics], "Folds", "Patients scored"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    ok = folds[folds["status"] == "ok"]
    n_folds = ok["n_folds"].dropna().max() if not ok.empty else float("nan")
    partition = ", ".join(sorted(set(ok["partition"]))) or "n/a"
    protocol = ", ".join(sorted(set(ok["protocol"]) - {""})) or "n/a"
    lines = [
        f"# {dataset} — {task}",
        "",
        f"- **Dataset**: `{dataset}`; **task**: `{task}` ({kind})",
        f"- **Protocol**: {protocol}; {int(n_folds) if n_folds == n_folds else '?'} folds; "
        f"seeds: {sorted(set(ok['seed'])) if not ok.empty else []}; metrics on the `{partition}` partition of each fold",
        "- **Numbers**: mean ± sample standard deviation over folds (4 decimals); no model selection on the reported partition",
        f"- **Runs**: commits {', '.join(sorted(set(c[:10] for c in ok['git_commit'] if c))) or 'n/a'}",
        "",
        table,
        "",
    ]
    if notes:
        lines += [f"[^{i}]: {n}" for i, n in enumerate(notes, 1)] + [""]
    return "\n".join(lines), stats


def build(out_dir: Path, leaderboard_dir: Path) -> list[Path]:
    """(Re)write every leaderboard from the result files under out_dir; returns the Markdown paths."""
    records = list(iter_results(out_dir))
    if not records:
        return []
    folds = fold_table(records)
    written = []
    for (dataset, task), group in folds.groupby(["dataset", "task"]):
        plan_file = plan_path(out_dir, dataset, task)
        planned = set(json.loads(plan_file.read_text())) if plan_file.exists() else set()
        markdown, _ = render(dataset, task, group.copy(), planned)
        md = Path(leaderboard_dir) / f"{dataset}_{task}.md"
        atomic_write_text(md, markdown)
        cols = [c for c in group.columns if c not in ("error",)]
        atomic_write_text(md.with_suffix(".csv"), group[cols].sort_values(["method", "fold", "seed"]).to_csv(index=False))
        written.append(md)
    return written
