"""A paper-style table over several leaderboards (`run_benchmark.py --leaderboard --combine`).

Methods as rows, each (dataset, task) a column group (classification: AUC and ACC, as the paper's
Table 4; survival: C-index), cells mean ± std over folds as in the leaderboards, best per column in
bold. Written as Markdown and as LaTeX (booktabs). The LaTeX is written by hand: it is a dozen lines,
and pandas' Styler would add a jinja2 dependency for no gain."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark.leaderboard import METRIC_TITLES, fold_table, fmt, summarise, table_metrics
from benchmark.results import atomic_write_text

COLUMNS = {"classification": ("auc", "accuracy"), "survival": ("c_index",)}
RANDOM_MARK = "†"


@dataclass
class Group:
    dataset: str
    task: str
    metrics: tuple[str, ...]  # the columns shown
    summary: pd.DataFrame  # leaderboard.summarise(): (metric, mean|std|count) per method
    random_weights: set[str]  # methods that ran with a random-initialised pretrained encoder here

    @property
    def title(self) -> str:
        return f"{self.dataset} ({self.task})"


def parse_selection(items: list[str], available: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """['DATASET:TASK', ...] -> pairs, in the order given; no items: every table with results."""
    if not items:
        return available
    chosen = []
    for item in items:
        dataset, sep, task = item.partition(":")
        if not sep or not dataset or not task:
            raise ValueError(f"--combine {item}: expected DATASET:TASK, e.g. camelyon16:metastasis")
        if (dataset, task) not in available:
            names = ", ".join(f"{d}:{t}" for d, t in available)
            raise ValueError(f"--combine {item}: no results for it; tables with results: {names}")
        chosen.append((dataset, task))
    return chosen


def collect(folds: pd.DataFrame, selection: list[tuple[str, str]]) -> list[Group]:
    groups = []
    for dataset, task in selection:
        part = folds[(folds["dataset"] == dataset) & (folds["task"] == task)].copy()
        kind, metrics = table_metrics(part)
        random = set(part.loc[part["weights"] == "random", "method"])
        groups.append(Group(dataset, task, COLUMNS[kind], summarise(part, metrics), random))
    return groups


def method_order(groups: list[Group]) -> list[str]:
    """Rows by mean rank of the primary metric over the column groups a method appears in (best first)."""
    ranks: dict[str, list[float]] = {}
    for g in groups:
        primary = g.summary[(g.metrics[0], "mean")]
        for method, rank in primary.rank(ascending=False, na_option="bottom").items():
            ranks.setdefault(method, []).append(rank)
    return sorted(ranks, key=lambda m: (np.mean(ranks[m]), m))


def cell_values(groups: list[Group], methods: list[str]) -> list[list[tuple[float, float] | None]]:
    """[row][column] -> (mean, std), None where the method has no result in that table."""
    rows = []
    for method in methods:
        row = []
        for g in groups:
            for metric in g.metrics:
                if method in g.summary.index:
                    row.append((g.summary.loc[method, (metric, "mean")], g.summary.loc[method, (metric, "std")]))
                else:
                    row.append(None)
        rows.append(row)
    return rows


def best_in_column(values: list[list[tuple[float, float] | None]]) -> list[float]:
    means = np.array([[np.nan if v is None else v[0] for v in row] for row in values], dtype=float)
    return [np.nanmax(col) if np.isfinite(col).any() else np.nan for col in means.T]


def column_random(groups: list[Group]) -> list[set[str]]:
    return [g.random_weights for g in groups for _ in g.metrics]


def to_markdown(groups: list[Group], methods: list[str]) -> str:
    values = cell_values(groups, methods)
    best, random = best_in_column(values), column_random(groups)
    rows = []
    for method, row in zip(methods, values):
        cells = [method]
        for j, v in enumerate(row):
            if v is None:
                cells.append("—")
                continue
            text = fmt(*v)
            text = f"**{text}**" if v[0] == best[j] else text
            cells.append(text + (RANDOM_MARK if method in random[j] else ""))
        rows.append(cells)
    headers = ["Method", *[f"{g.title} {METRIC_TITLES[m]}" for g in groups for m in g.metrics]]
    return "\n".join([
        "# Combined results",
        "",
        "Mean ± sample standard deviation over folds (4 decimals), from the same result files as each leaderboard; "
        f"best per column in bold; {RANDOM_MARK}: ran with a random-initialised pretrained encoder "
        "(not comparable to published numbers); —: no result.",
        "",
        tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True),
        "",
    ])


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(groups: list[Group], methods: list[str]) -> str:
    values = cell_values(groups, methods)
    best, random = best_in_column(values), column_random(groups)
    n_cols = sum(len(g.metrics) for g in groups)
    group_row, rules, start = [""], [], 2
    for g in groups:
        width = len(g.metrics)
        group_row.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(g.title)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    metric_row = ["Method", *[METRIC_TITLES[m] for g in groups for m in g.metrics]]
    body = []
    for method, row in zip(methods, values):
        cells = [latex_escape(method)]
        for j, v in enumerate(row):
            if v is None:
                cells.append("--")
                continue
            text = fmt(*v).replace(" ± ", r" $\pm$ ")
            text = rf"\textbf{{{text}}}" if v[0] == best[j] else text
            cells.append(text + (r"$^\dagger$" if method in random[j] else ""))
        body.append(" & ".join(cells) + r" \\")
    return "\n".join([
        "% wsi-bench combined table (run_benchmark.py --leaderboard --combine); needs \\usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{Mean $\pm$ standard deviation over folds; best per column in bold; "
        r"$^\dagger$ random-initialised pretrained encoder.}",
        r"\label{tab:wsi-bench}",
        rf"\begin{{tabular}}{{l{'c' * n_cols}}}",
        r"\toprule",
        " & ".join(group_row) + r" \\",
        " ".join(rules),
        " & ".join(metric_row) + r" \\",
        r"\midrule",
        *body,
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
        "",
    ])


def write_combined(records: list[dict], leaderboard_dir: Path, items: list[str]) -> list[Path]:
    """Write combined.md and combined.tex for the DATASET:TASK items (none: every table with results),
    from the result records the leaderboards were built from."""
    folds = fold_table(records)
    available = sorted(set(zip(folds["dataset"], folds["task"])))
    groups = collect(folds, parse_selection(items, available))
    methods = method_order(groups)
    md, tex = Path(leaderboard_dir) / "combined.md", Path(leaderboard_dir) / "combined.tex"
    atomic_write_text(md, to_markdown(groups, methods))
    atomic_write_text(tex, to_latex(groups, methods))
    return [md, tex]
