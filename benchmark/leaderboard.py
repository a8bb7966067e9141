"""Leaderboards from result files alone, per (dataset, task): a Markdown table (mean +- std over folds,
a pooled bootstrap interval, paired comparisons with the best row), a CSV of per-fold numbers, a CSV
of the statistics, and pictures (ROC or Kaplan-Meier curves, C-index per fold) linked from the
Markdown; plus an index of every table (leaderboards/README.md)."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark import plots, stats
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
        known = load_plan(out_dir, dataset, task)
        atomic_write_text(plan_path(out_dir, dataset, task), json.dumps(sorted(known | jobs), indent=0))


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
        row["task_kind"] = r.get("config", {}).get("task_kind")
        cost = r.get("cost", {})
        row["cost_device"] = cost.get("device", "")
        row["train_s_per_slide"] = cost.get("train_s_per_slide", np.nan)
        row["infer_s_per_slide"] = cost.get("infer_s_per_slide", np.nan)
        row["peak_mem_gb"] = cost.get("peak_gpu_mem_gb", cost.get("peak_rss_gb", np.nan))
        row.update({k: (np.nan if v is None else v) for k, v in r.get("metrics", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(folds: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """Mean and sample std over folds (each fold first averaged over seeds), per method; best first by
    the primary metric's mean, ties broken by the next metrics' means, then by name (a stable order)."""
    ok = folds[folds["status"] == "ok"]
    per_fold = ok.groupby(["method", "fold"])[list(metrics)].mean()
    stats = per_fold.groupby("method").agg(["mean", "std", "count"]).sort_index()
    return stats.sort_values([(m, "mean") for m in metrics], ascending=False, kind="stable", na_position="last")


def fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.4f} ± {0.0 if np.isnan(std) else std:.4f}"


INDEX_NAME = "README.md"
PLOTS_DIR = "plots"
ALPHA = 0.05  # significance level of the marks in the paired-comparison table


@dataclass
class Comparison:
    """One method against the best row: a paired test across folds and a paired bootstrap."""

    folds: stats.FoldComparison
    pooled: stats.PairedBootstrap | None  # None when the two methods scored no patient in common

    @property
    def t_significant(self) -> bool:
        return bool(self.folds.t_p < ALPHA)

    @property
    def bootstrap_significant(self) -> bool:
        return self.pooled is not None and self.pooled.excludes_zero


@dataclass
class KaplanMeier:
    groups: pd.DataFrame  # one row per patient: patient_id, time, event, high
    test: stats.LogRank
    fallback_jobs: list[str]  # jobs without info["train_risk_median"], split at their own median


@dataclass
class Board:
    """Everything one leaderboard shows, computed from the result records of one (dataset, task)."""

    dataset: str
    task: str
    kind: str
    metrics: tuple[str, ...]
    folds: pd.DataFrame  # fold_table() of the records
    summary: pd.DataFrame  # summarise(): mean / std / count per method, best first
    pooled: dict[str, pd.DataFrame]  # method -> pooled reported-partition predictions
    intervals: dict[str, dict[str, stats.Interval]] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    km: dict[str, KaplanMeier] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return f"{self.dataset}_{self.task}"

    @property
    def primary(self) -> str:
        return self.metrics[0]

    @property
    def best(self) -> str | None:
        if self.summary.empty or np.isnan(self.summary[(self.primary, "mean")].iloc[0]):
            return None
        return str(self.summary.index[0])


def table_kind(folds: pd.DataFrame) -> str:
    kinds = set(folds.get("task_kind", pd.Series(dtype=object)).dropna())
    if len(kinds) == 1:  # recorded in every job's config, failed jobs included
        return kinds.pop()
    return "survival" if "c_index" in folds.columns and folds["c_index"].notna().any() else "classification"


def train_risk_median(record: dict) -> float:
    """The contract for survival methods: info['train_risk_median'] is the median risk that the fold's
    model gives the fold's training patients (same scale as its reported risks); NaN when absent."""
    value = record.get("info", {}).get("train_risk_median")
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{record.get('_path', 'a result file')}: info['train_risk_median'] is {value!r}, not a "
                         "number; the method must store the median training-fold risk as a float, then rerun that job")
    return float(value)


def pooled_predictions(records: list[dict], kind: str) -> dict[str, pd.DataFrame]:
    """Per method: the reported-partition predictions of its successful jobs, tagged with fold and seed."""
    frames: dict[str, list[pd.DataFrame]] = {}
    for r in records:
        preds = pd.DataFrame(r.get("predictions", []))
        if r["status"] != "ok" or preds.empty:
            continue
        preds = preds[preds["partition"] == r["reported_partition"]]
        if preds.empty:
            continue
        preds = preds.assign(fold=r["job"]["fold"], seed=r["job"]["seed"])
        if kind == "survival":
            preds["train_risk_median"] = train_risk_median(r)
        frames.setdefault(r["job"]["method"], []).append(preds)
    return {method: pd.concat(parts, ignore_index=True).sort_values(["patient_id", "fold", "seed"], kind="mergesort")
            .reset_index(drop=True) for method, parts in sorted(frames.items())}


def shares_patients(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return bool(set(a["patient_id"]) & set(b["patient_id"]))


def table_metrics(folds: pd.DataFrame) -> tuple[str, tuple[str, ...]]:
    """The kind of one (dataset, task) table and its metric names; a metric column no result has is
    added to `folds` as NaN."""
    kind = table_kind(folds)
    metrics = metric_names(kind)
    for m in metrics:
        if m not in folds.columns:
            folds[m] = np.nan
    return kind, metrics


def analyse(dataset: str, task: str, folds: pd.DataFrame, records: list[dict]) -> Board:
    kind, metrics = table_metrics(folds)
    board = Board(dataset, task, kind, metrics, folds, summarise(folds, metrics), pooled_predictions(records, kind))
    board.intervals = {m: stats.bootstrap_ci(kind, rows) for m, rows in board.pooled.items()}
    best = board.best
    if best is not None:
        ok = folds[folds["status"] == "ok"]
        per_fold = ok.groupby(["method", "fold"])[board.primary].mean().unstack("method")
        for method in board.summary.index:
            if method == best:
                continue
            a, b = board.pooled.get(method), board.pooled.get(best)
            paired = (stats.paired_bootstrap(kind, board.primary, a, b)
                      if a is not None and b is not None and shares_patients(a, b) else None)
            board.comparisons[method] = Comparison(stats.paired_fold_test(per_fold[method], per_fold[best]), paired)
    if kind == "survival":
        for method, rows in board.pooled.items():
            groups, fallback = stats.risk_groups(rows)
            board.km[method] = KaplanMeier(groups, stats.logrank(groups["time"], groups["event"], groups["high"]), fallback)
    return board


def safe_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", method)


PLOT_CODE_DIGEST = hashlib.sha256(Path(plots.__file__).read_bytes()).hexdigest()
PLOT_INPUTS = ".inputs.json"  # picture name -> digest of what it was drawn from


def input_digest(*parts) -> str:
    """Digest of a picture's inputs and of the drawing code: an unchanged picture is not redrawn."""
    h = hashlib.sha256(PLOT_CODE_DIGEST.encode())
    for part in parts:
        h.update(part.to_csv(index=False).encode() if isinstance(part, pd.DataFrame) else repr(part).encode())
    return h.hexdigest()[:16]


def picture_specs(board: Board) -> list[tuple[str, str, str, Callable[[Path], Path]]]:
    """(alt text, file name, input digest, draw(path)) of every picture of the board."""
    order = [m for m in board.summary.index if m in board.pooled]
    specs = []
    if board.kind == "classification":
        if order:
            pooled = {m: board.pooled[m] for m in order}
            specs.append(("ROC of every method, pooled", "overlay_roc.png", input_digest(order, *pooled.values()),
                          lambda path: plots.roc_overlay(pooled, path)))
        for m in order:
            specs.append((f"ROC, {m}", f"roc_{safe_name(m)}.png", input_digest(m, board.pooled[m]),
                          lambda path, m=m: plots.roc_figure(m, board.pooled[m], path)))
        return specs
    if not board.summary.empty:
        per_job = board.folds.loc[board.folds["status"] == "ok", ["method", "fold", "seed", "c_index"]]
        methods = list(board.summary.index)
        specs.append(("C-index per fold", "cindex_folds.png", input_digest(methods, per_job),
                      lambda path: plots.c_index_strip(per_job, methods, path)))
    for m in order:
        km = board.km[m]
        specs.append((f"Kaplan-Meier, {m}", f"km_{safe_name(m)}.png",
                      input_digest(m, km.groups, km.test, km.fallback_jobs),
                      lambda path, m=m, km=km: plots.km_figure(m, km.groups, km.test, km.fallback_jobs, path)))
    return specs


def draw(board: Board, leaderboard_dir: Path) -> list[tuple[str, str]]:
    """Write the board's pictures; returns (alt text, path relative to leaderboard_dir) per picture.

    A picture whose inputs did not change since it was drawn is kept as it is (the runner rebuilds every
    leaderboard after each run); pictures of this board that are no longer linked are removed."""
    plot_dir = Path(leaderboard_dir) / PLOTS_DIR / board.stem
    ledger = plot_dir / PLOT_INPUTS
    drawn = json.loads(ledger.read_text()) if ledger.exists() else {}
    specs = picture_specs(board)
    for _, name, digest, draw_picture in specs:
        if drawn.get(name) != digest or not (plot_dir / name).exists():
            draw_picture(plot_dir / name)
    names = {name for _, name, _, _ in specs}
    for old in plot_dir.glob("*.png"):
        if old.name not in names:
            old.unlink()
    if specs:
        atomic_write_text(ledger, json.dumps({name: digest for _, name, digest, _ in specs}, indent=1, sort_keys=True))
    return [(alt, f"{PLOTS_DIR}/{board.stem}/{name}") for alt, name, _, _ in specs]


def fmt_p(p: float) -> str:
    if np.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_interval(estimate: float, low: float, high: float, signed: bool = False) -> str:
    if np.isnan(estimate):
        return "n/a"
    f = "{:+.4f}" if signed else "{:.4f}"
    if np.isnan(low):
        return f.format(estimate) + " [n/a]"
    return f"{f.format(estimate)} [{f.format(low)}, {f.format(high)}]"


def comparison_section(board: Board) -> list[str]:
    if not board.comparisons:
        return []
    title = METRIC_TITLES[board.primary]
    rows = []
    for method, c in board.comparisons.items():
        mark = (" \\*" if c.t_significant else "") + (" †" if c.bootstrap_significant else "")
        pooled = c.pooled
        rows.append([method + mark, c.folds.n_folds,
                     "n/a" if np.isnan(c.folds.mean_diff) else f"{c.folds.mean_diff:+.4f}",
                     fmt_p(c.folds.t_p), fmt_p(c.folds.wilcoxon_p),
                     fmt_interval(pooled.diff, pooled.low, pooled.high, signed=True) if pooled else "n/a",
                     fmt_p(pooled.p) if pooled else "n/a"])
    headers = ["Method", "Folds paired", f"Δ {title} (mean over folds)", "Paired t-test p", "Wilcoxon p",
               f"Δ pooled {title} [95% bootstrap CI]", "Bootstrap p"]
    n = max(c.folds.n_folds for c in board.comparisons.values())
    k = int(board.folds["n_folds"].dropna().max()) if board.folds["n_folds"].notna().any() else n
    shared_test = "test" in set(board.folds["partition"])
    return [
        f"## Paired comparison with the best row (`{board.best}`, {title})",
        "",
        f"Δ = method − `{board.best}`. Across folds: the per-fold {title} (averaged over seeds) of the folds both "
        "methods finished, compared by a paired t-test (`scipy.stats.ttest_rel`) and a Wilcoxon signed-rank test "
        "(`scipy.stats.wilcoxon`; n/a when every difference is zero). Pooled: the metric on the pooled "
        f"predictions of the patients both methods scored, with a paired bootstrap ({stats.N_RESAMPLES} resamples "
        "of patients, the same patients for both methods, seeded).",
        "",
        tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True),
        "",
        f"\\* paired t-test across folds p < {ALPHA}; † the 95% paired-bootstrap interval of the pooled difference "
        "excludes 0. No correction for comparing several methods with the best.",
        "",
        f"**What these tests can and cannot say.** With {n} folds the fold-level tests see {n} differences. They "
        f"are not independent: any two training sets share {k - 2} of their {k - 1} parts "
        f"({(k - 2) / max(k - 1, 1):.0%} of their patients)"
        + (", and every fold scores the same test patients" if shared_test else "")
        + ", so the spread of the differences understates the real variability and the t-test's p-value is too "
        f"optimistic. With so few folds the tests also have little power: a real difference can easily give "
        f"p ≥ {ALPHA}, and the exact Wilcoxon test cannot go below p = {stats.smallest_wilcoxon_p(n):.4f} with "
        f"{n} folds. The paired bootstrap shows how much the pooled difference depends on which patients happen "
        "to be in the cohort; it does not show how much it would change if the models were trained on other "
        f"patients. p ≥ {ALPHA} means no evidence of a difference in these data, not that the methods are "
        "equal; a mark is a reason to look closer, not a proof.",
        "",
    ]


def km_section(board: Board) -> list[str]:
    if not board.km:
        return []
    rows, warn = [], []
    for method in [m for m in board.summary.index if m in board.km]:
        km = board.km[method]
        jobs = board.pooled[method][["fold", "seed"]].drop_duplicates()
        if not km.fallback_jobs:
            split = "training-fold median"
        else:
            which = "all jobs" if len(km.fallback_jobs) == len(jobs) else ", ".join(km.fallback_jobs)
            split = f"⚠ own median of the scored patients ({which})"
            warn.append(method)
        high = int(km.groups["high"].sum())
        rows.append([method, split, high, len(km.groups) - high, fmt_p(km.test.p)])
    lines = ["## Kaplan-Meier: high- vs low-risk halves", "",
             "Each fold's predictions are split at the median risk of that fold's training patients "
             "(`info[\"train_risk_median\"]` in the result file); a patient scored several times is high-risk "
             "when at least half of its predictions are. Log-rank test: `sksurv.compare.compare_survival`.", "",
             tabulate(rows, headers=["Method", "Split at", "High-risk patients", "Low-risk patients", "Log-rank p"],
                      tablefmt="github", disable_numparse=True), ""]
    if warn:
        lines += [f"⚠ **Warning**: {', '.join(f'`{m}`' for m in warn)} did not record `train_risk_median`; "
                  "their split falls back to the median of the fold's own scored risks, which uses the "
                  "evaluated patients themselves (the halves are balanced by construction and the log-rank "
                  "p-value is optimistic).", ""]
    return lines


def plots_section(links: list[tuple[str, str]]) -> list[str]:
    if not links:
        return []
    lines = ["## Plots", ""]
    for alt, path in links:
        lines += [f"![{alt}]({path})", ""]
    return lines


def cost_cell(jobs: pd.DataFrame) -> str:
    """What a method's numbers cost, measured by the runner: mean seconds per slide seen in training (one
    slide in one epoch) and per slide in inference, and the largest peak memory (GPU memory on a GPU, the process RSS on the
    CPU), prefixed by the device."""
    ok = jobs[jobs["status"] == "ok"]
    if ok.empty or ok["train_s_per_slide"].isna().all():
        return "n/a"
    device = "/".join(sorted(set(ok["cost_device"]) - {""})) or "?"
    return (f"{device} {ok['train_s_per_slide'].mean():.3g} · {ok['infer_s_per_slide'].mean():.3g} · "
            f"{ok['peak_mem_gb'].max():.3g}")


def render(board: Board, planned: set[str], links: list[tuple[str, str]]) -> str:
    folds, metrics, stats_ = board.folds, board.metrics, board.summary
    notes: list[str] = []
    rows = []
    for method in stats_.index:
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
        ci = board.intervals.get(method, {}).get(board.primary)
        rows.append([method + mark, *[fmt(stats_.loc[method, (m, "mean")], stats_.loc[method, (m, "std")]) for m in metrics],
                     fmt_interval(ci.estimate, ci.low, ci.high) if ci else "n/a",
                     int(stats_.loc[method, (metrics[0], "count")]), int(n_pat.sum()), cost_cell(mine)])
    for _, r in folds[folds["status"] != "ok"].iterrows():
        notes.append(f"{r['method']} fold {r['fold']} seed {r['seed']} failed: {str(r['error']).splitlines()[0][:200]}")
    done = {f"{r.method}|{r.fold}|{r.seed}" for r in folds[folds["status"] == "ok"].itertuples()}
    failed = {f"{r.method}|{r.fold}|{r.seed}" for r in folds[folds["status"] != "ok"].itertuples()}
    for key in sorted(planned - done - failed):
        method, fold, seed = key.split("|")
        notes.append(f"{method} fold {fold} seed {seed}: no result yet (not run or interrupted).")
    headers = ["Method", *[METRIC_TITLES[m] for m in metrics], f"{METRIC_TITLES[board.primary]} pooled [95% CI]",
               "Folds", "Patients scored", "Cost: s per slide-epoch train · s per slide infer · peak GB"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    ok = folds[folds["status"] == "ok"]
    n_folds = ok["n_folds"].dropna().max() if not ok.empty else float("nan")
    partition = ", ".join(sorted(set(ok["partition"]))) or "n/a"
    protocol = ", ".join(sorted(set(ok["protocol"]) - {""})) or "n/a"
    lines = [
        f"# {board.dataset} — {board.task}",
        "",
        f"- **Dataset**: `{board.dataset}`; **task**: `{board.task}` ({board.kind})",
        f"- **Protocol**: {protocol}; {int(n_folds) if n_folds == n_folds else '?'} folds; "
        f"seeds: {sorted(set(ok['seed'])) if not ok.empty else []}; metrics on the `{partition}` partition of each fold",
        "- **Numbers**: mean ± sample standard deviation over folds (4 decimals); no model selection on the reported partition",
        f"- **Pooled [95% CI]**: {METRIC_TITLES[board.primary]} of the `{partition}` predictions of all folds pooled, with a "
        f"percentile bootstrap interval ({stats.N_RESAMPLES} resamples of patients, seed {stats.SEED})",
        f"- **Runs**: commits {', '.join(sorted(set(c[:10] for c in ok['git_commit'] if c))) or 'n/a'}",
        "",
        table,
        "",
    ]
    if notes:
        lines += [f"[^{i}]: {n}" for i, n in enumerate(notes, 1)] + [""]
    lines += comparison_section(board) + km_section(board) + plots_section(links)
    return "\n".join(lines)


def stats_table(board: Board) -> pd.DataFrame:
    """The numbers behind the Markdown's extra columns and sections, one row per method (CSV)."""
    rows = []
    for method in board.summary.index:
        row: dict = {"method": method}
        for metric, ci in board.intervals.get(method, {}).items():
            row.update({f"{metric}_pooled": ci.estimate, f"{metric}_ci_low": ci.low, f"{metric}_ci_high": ci.high})
        c = board.comparisons.get(method)
        if c is not None:
            row.update({"vs_best": board.best, "folds_paired": c.folds.n_folds, "mean_fold_diff": c.folds.mean_diff,
                        "t_test_p": c.folds.t_p, "wilcoxon_p": c.folds.wilcoxon_p})
            if c.pooled is not None:
                row.update({"pooled_diff": c.pooled.diff, "pooled_diff_ci_low": c.pooled.low,
                            "pooled_diff_ci_high": c.pooled.high, "bootstrap_p": c.pooled.p})
        km = board.km.get(method)
        if km is not None:
            row.update({"km_split": "own_median" if km.fallback_jobs else "train_median",
                        "n_high_risk": int(km.groups["high"].sum()), "n_low_risk": int((~km.groups["high"]).sum()),
                        "logrank_chisq": km.test.chisq, "logrank_p": km.test.p})
        rows.append(row)
    return pd.DataFrame(rows)


def load_plan(out_dir: Path, dataset: str, task: str) -> set[str]:
    path = plan_path(out_dir, dataset, task)
    return set(json.loads(path.read_text())) if path.exists() else set()


def build(out_dir: Path, leaderboard_dir: Path, records: list[dict] | None = None) -> list[Path]:
    """(Re)write every leaderboard, its pictures and the index from the result files under out_dir
    (`records`: those files, when the caller has read them already).

    Returns the Markdown paths: one per (dataset, task), then the index."""
    records = list(iter_results(out_dir)) if records is None else records
    if not records:
        return []
    folds = fold_table(records)
    written, entries = [], []
    for (dataset, task), group in folds.groupby(["dataset", "task"]):
        mine = [r for r in records if (r["job"]["dataset"], r["job"]["task"]) == (dataset, task)]
        planned = load_plan(out_dir, dataset, task)
        board = analyse(dataset, task, group.copy(), mine)
        md = Path(leaderboard_dir) / f"{board.stem}.md"
        atomic_write_text(md, render(board, planned, draw(board, Path(leaderboard_dir))))
        cols = [c for c in group.columns if c not in ("error",)]
        atomic_write_text(md.with_suffix(".csv"), group[cols].sort_values(["method", "fold", "seed"]).to_csv(index=False))
        atomic_write_text(md.with_name(f"{board.stem}_stats.csv"), stats_table(board).to_csv(index=False))
        written.append(md)
        entries.append(index_entry(board, mine, planned))
    index = Path(leaderboard_dir) / INDEX_NAME
    atomic_write_text(index, render_index(entries))
    return [*written, index]


def method_marks(board: Board, planned: set[str]) -> list[str]:
    """Methods that ran with random weights or on partial data (missing slides, failed or missing jobs)."""
    marks = []
    for method, mine in board.folds.groupby("method"):
        why = []
        if (mine["weights"] == "random").any():
            why.append("random weights")
        missing = int(mine.loc[mine["status"] == "ok", "missing_slides"].max() or 0) if (mine["status"] == "ok").any() else 0
        if missing:
            why.append(f"{missing} slides missing")
        jobs = {k.split("|", 1)[1] for k in planned if k.split("|")[0] == method}
        expected = len(jobs | {f"{r.fold}|{r.seed}" for r in mine.itertuples()})
        n_ok = int((mine["status"] == "ok").sum())
        if n_ok < expected:
            why.append(f"{n_ok}/{expected} jobs")
        if why:
            marks.append(f"`{method}` ({', '.join(why)})")
    return marks


def index_entry(board: Board, records: list[dict], planned: set[str]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    patients = max((sum(r.get("n_patients", {}).values()) for r in ok), default=None)
    slides = [sum(r["n_slides"].values()) for r in ok if isinstance(r.get("n_slides"), dict)]
    dates = sorted(r["finished_at"][:10] for r in ok if r.get("finished_at"))
    best = board.best
    best_cell = "n/a"
    if best is not None:
        mean, std = board.summary.loc[best, (board.primary, "mean")], board.summary.loc[best, (board.primary, "std")]
        best_cell = f"`{best}` ({METRIC_TITLES[board.primary]} {fmt(mean, std)})"
    n_folds = board.folds["n_folds"].dropna()
    return {
        "Leaderboard": f"[{board.dataset} — {board.task}]({board.stem}.md)",
        "Kind": board.kind,
        "Best method": best_cell,
        "Patients": str(patients) if patients is not None else "n/a",
        "Slides": str(max(slides)) if slides else "n/a",
        "Protocol": ", ".join(sorted({r.get("protocol", "") for r in ok} - {""})) or "n/a",
        "Folds": str(int(n_folds.max())) if not n_folds.empty else "n/a",
        "Runs finished": (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "n/a",
        "Commits": ", ".join(sorted({r["git_commit"][:10] for r in ok if r.get("git_commit")})) or "n/a",
        "Marked methods": "; ".join(method_marks(board, planned)) or "—",
    }


def render_index(entries: list[dict]) -> str:
    table = tabulate([list(e.values()) for e in entries], headers=list(entries[0]), tablefmt="github",
                     disable_numparse=True)
    return "\n".join([
        "# Leaderboards",
        "",
        "Every dataset × task with results, rebuilt from the result files by `python run_benchmark.py --leaderboard`.",
        "Best method: the highest mean of the primary metric (AUC or C-index) over folds. Patients: every patient "
        "of the task's folds (all partitions); slides: n/a where the result files do not record `n_slides`. "
        "Marked methods ran with random weights or on partial data (slides missing, jobs failed or not run).",
        "",
        table,
        "",
    ])
