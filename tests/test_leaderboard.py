"""Leaderboards with pictures, intervals, paired comparisons, the index and the combined table."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sksurv.compare import compare_survival
from sksurv.util import Surv

from benchmark import cli, leaderboard, stats
from benchmark.metrics import compute_metrics
from benchmark.results import result_path, write_result
from benchmark.runner import RunOptions, run

LINK = re.compile(r"!?\[[^\]]*\]\(([^)]+)\)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_job(out, method, fold, preds, *, task="binary", kind="classification", seed=0, weights="none", info=None,
              missing=(), n_slides=None):
    """A result file as the runner writes it (the fields the leaderboard reads)."""
    record = {"job": {"method": method, "dataset": "demo", "task": task, "fold": fold, "seed": seed},
              "status": "ok", "config": {"n_folds": 5}, "git_commit": "0123456789abcdef", "protocol": "demo protocol",
              "finished_at": f"2025-01-0{fold + 1}T12:00:00+00:00", "weights": weights, "missing_slides": list(missing),
              "info": info or {}, "reported_partition": "val", "predictions": preds.to_dict("records"),
              "metrics": compute_metrics(kind, preds), "n_patients": {"train": 4 * len(preds), "val": len(preds)}}
    if n_slides is not None:
        record["n_slides"] = n_slides
    write_result(result_path(out, "demo", task, method, fold, seed), record)


def binary_preds(fold, strength, rng, n=30):
    labels = np.arange(n) % 2
    p1 = 1 / (1 + np.exp(-(strength * (labels - 0.5) + rng.normal(size=n))))
    return pd.DataFrame({"patient_id": [f"F{fold}P{i:02d}" for i in range(n)], "partition": "val", "label": labels,
                         "prob_0": 1 - p1, "prob_1": p1})


def linked_files(markdown_path):
    text = Path(markdown_path).read_text()
    return [(markdown_path.parent / target) for target in LINK.findall(text) if "://" not in target]


def test_toy_run_links_existing_pictures_index_and_combined_table(tmp_path, toy_registries, capsys):
    base = dict(methods=["toy", "toy2"], dataset="toy", n_folds=5, out_dir=tmp_path / "out",
                leaderboard_dir=tmp_path / "lb", cache_dir=tmp_path / "cache", progress=False)
    run(RunOptions(**base))
    run(RunOptions(**base, task="survival"))
    lb = tmp_path / "lb"
    assert cli.main(["--leaderboard", "--combine", "--out", str(tmp_path / "out"), "--leaderboard-dir", str(lb)]) == 0
    # every link of every Markdown file (tables, index, combined) resolves; every picture is a PNG
    for md in lb.glob("*.md"):
        for target in linked_files(md):
            assert target.is_file(), f"{md.name} links {target}, which does not exist"
            if target.suffix == ".png":
                assert target.read_bytes()[:8] == PNG_MAGIC
    binary, survival = (lb / "toy_binary.md").read_text(), (lb / "toy_survival.md").read_text()
    for name in ("overlay_roc", "roc_toy", "roc_toy2"):
        assert f"(plots/toy_binary/{name}.png)" in binary
    for name in ("cindex_folds", "km_toy", "km_toy2"):
        assert f"(plots/toy_survival/{name}.png)" in survival
    # the toy method reports its training-fold median risk: the split uses it, with no fallback warning
    assert "training-fold median" in survival and "Warning" not in survival
    # the pooled CI column equals a bootstrap of the predictions read back from the result files
    preds = []
    for path in sorted((tmp_path / "out/results/toy/binary/toy").glob("fold*_seed0.json")):
        r = json.loads(path.read_text())
        preds += [p for p in r["predictions"] if p["partition"] == r["reported_partition"]]
    ci = stats.bootstrap_ci("classification", pd.DataFrame(preds))["auc"]
    row = next(line for line in binary.splitlines() if line.startswith("| toy "))
    assert f"{ci.estimate:.4f} [{ci.low:.4f}, {ci.high:.4f}]" in row
    # the index lists both tables with their best method and patients
    index = (lb / "README.md").read_text()
    best = pd.read_csv(lb / "toy_binary.csv").groupby("method")["auc"].mean().idxmax()
    assert re.search(rf"\[toy — binary\]\(toy_binary.md\) *\| classification *\| `{best}` \(AUC", index)
    assert "[toy — survival](toy_survival.md)" in index and "| 30 " in index
    # the combined table: both tables as column groups, cells as in the leaderboards
    combined = (lb / "combined.md").read_text()
    assert "toy (binary) AUC" in combined and "toy (survival) C-index" in combined
    auc_cell = next(line for line in binary.splitlines() if line.startswith("| toy2 ")).split("|")[2].strip()
    assert auc_cell in next(line for line in combined.splitlines() if line.startswith("| toy2 "))
    tex = (lb / "combined.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-3}"))
    body = tex[tex.index(r"\midrule") + len(r"\midrule"):tex.index(r"\bottomrule")].strip().splitlines()
    assert len(body) == 2 and all(line.count(" & ") == 3 and line.endswith(r"\\") for line in body)
    assert auc_cell.replace(" ± ", r" $\pm$ ") in tex
    best_cell = binary.split("\n| ")[2].split("|")[1].strip()  # first data row of the table: the best AUC
    assert r"\textbf{" + best_cell.replace(" ± ", r" $\pm$ ") + "}" in tex and f"**{best_cell}**" in combined
    capsys.readouterr()
    assert cli.main(["--leaderboard", "--combine", "toy:nope", "--out", str(tmp_path / "out"),
                     "--leaderboard-dir", str(lb)]) == 2
    assert "toy:nope: no results for it; tables with results: toy:binary, toy:survival" in capsys.readouterr().err


def test_paired_comparison_marks_significant_rows(tmp_path):
    rng = np.random.default_rng(0)
    for fold in range(5):
        write_job(tmp_path, "strong", fold, binary_preds(fold, 6.0, rng))
        write_job(tmp_path, "weak", fold, binary_preds(fold, 0.3, rng))
        write_job(tmp_path, "twin", fold, binary_preds(fold, 6.0, rng))
    leaderboard.build(tmp_path, tmp_path / "lb")
    md = (tmp_path / "lb/demo_binary.md").read_text()
    section = md[md.index("## Paired comparison"):]
    weak = next(line for line in section.splitlines() if line.startswith("| weak"))
    assert weak.startswith("| weak \\* †")
    # the printed fold test equals scipy on the per-fold AUCs of the CSV
    folds = pd.read_csv(tmp_path / "lb/demo_binary.csv").pivot(index="fold", columns="method", values="auc")
    best = folds.mean().idxmax()
    p = scipy_stats.ttest_rel(folds["weak"], folds[best]).pvalue
    assert f"| {leaderboard.fmt_p(p)} " in weak and f"{(folds['weak'] - folds[best]).mean():+.4f}" in weak
    other = "twin" if best == "strong" else "strong"
    assert not next(line for line in section.splitlines() if line.startswith(f"| {other}")).startswith(f"| {other} \\*")
    assert "cannot go below p = 0.0625 with 5 folds" in section
    numbers = pd.read_csv(tmp_path / "lb/demo_binary_stats.csv").set_index("method")
    assert numbers.loc["weak", "t_test_p"] == pytest.approx(p)


def survival_preds(fold, risks, times, events):
    return pd.DataFrame({"patient_id": [f"F{fold}P{i}" for i in range(len(risks))], "partition": "val",
                         "time": times, "event": events, "risk": risks})


def test_kaplan_meier_split_uses_training_fold_medians(tmp_path):
    times = [2.0, 4, 6, 8, 10, 12, 14, 16]
    events = [1, 1, 0, 1, 1, 1, 0, 1]
    # the scored risks' median is 3.5 in both folds; the training medians say 1.5 (fold 0) and 5.5 (fold 1)
    risks = [0, 1, 2, 3, 4, 5, 6, 7]
    write_job(tmp_path, "m", 0, survival_preds(0, risks, times, events), task="survival", kind="survival",
              info={"train_risk_median": 1.5})
    write_job(tmp_path, "m", 1, survival_preds(1, risks, times, events), task="survival", kind="survival",
              info={"train_risk_median": 5.5})
    write_job(tmp_path, "gone", 0, survival_preds(0, risks, times, events), task="survival", kind="survival")
    leaderboard.build(tmp_path, tmp_path / "lb")
    assert (tmp_path / "lb/plots/demo_survival/km_gone.png").exists()
    result_path(tmp_path, "demo", "survival", "gone", 0, 0).unlink()
    leaderboard.build(tmp_path, tmp_path / "lb")
    assert not (tmp_path / "lb/plots/demo_survival/km_gone.png").exists()  # stale picture removed
    md = (tmp_path / "lb/demo_survival.md").read_text()
    assert "| m        | training-fold median" in md and "Warning" not in md
    high = np.array([r > 1.5 for r in risks] + [r > 5.5 for r in risks])  # 6 + 2 high-risk patients
    y = Surv.from_arrays(event=np.array(events * 2, bool), time=np.array(times * 2))
    _, p = compare_survival(y, high)
    numbers = pd.read_csv(tmp_path / "lb/demo_survival_stats.csv").set_index("method")
    assert (numbers.loc["m", "n_high_risk"], numbers.loc["m", "n_low_risk"]) == (8, 8)
    assert numbers.loc["m", "logrank_p"] == pytest.approx(p)
    assert numbers.loc["m", "km_split"] == "train_median"


def test_invalid_train_risk_median_is_refused(tmp_path):
    write_job(tmp_path, "m", 0, survival_preds(0, [1, 2], [3.0, 4.0], [1, 1]), task="survival", kind="survival",
              info={"train_risk_median": "high"})
    with pytest.raises(ValueError, match=r"info\['train_risk_median'\] is 'high', not a number"):
        leaderboard.build(tmp_path, tmp_path / "lb")


def test_index_marks_random_weights_and_partial_data(tmp_path):
    rng = np.random.default_rng(1)
    for fold in range(2):
        write_job(tmp_path, "rand", fold, binary_preds(fold, 4.0, rng), weights="random",
                  n_slides={"train": 150, "val": 38})
        write_job(tmp_path, "part", fold, binary_preds(fold, 3.0, rng), missing=["S1", "S2"] if fold else [])
    json.dump(["rand|0|0", "rand|1|0", "part|0|0", "part|1|0", "part|2|0"],
              (tmp_path / "results/demo/binary/plan.json").open("w"))
    leaderboard.build(tmp_path, tmp_path / "lb")
    row = next(line for line in (tmp_path / "lb/README.md").read_text().splitlines() if "demo — binary" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:9] == ["150", "188", "demo protocol", "5", "2025-01-01 to 2025-01-02", "0123456789"]
    assert cells[9] == "`part` (2 slides missing, 2/3 jobs); `rand` (random weights)"


def test_unchanged_pictures_are_not_redrawn(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    for fold in range(2):
        for method in ("a", "b"):
            write_job(tmp_path, method, fold, binary_preds(fold, 2.0, rng, n=10))
    leaderboard.build(tmp_path, tmp_path / "lb")
    redrawn = []
    monkeypatch.setattr(leaderboard.plots, "roc_figure", lambda method, rows, path: redrawn.append(method))
    monkeypatch.setattr(leaderboard.plots, "roc_overlay", lambda pooled, path: redrawn.append("overlay"))
    leaderboard.build(tmp_path, tmp_path / "lb")
    assert redrawn == []
    write_job(tmp_path, "b", 1, binary_preds(1, 5.0, rng, n=10))  # b's predictions change
    leaderboard.build(tmp_path, tmp_path / "lb")
    assert sorted(redrawn) == ["b", "overlay"]


def test_ties_on_the_primary_metric_are_broken_by_the_next_metrics_then_by_name():
    folds = pd.DataFrame({"method": ["zeta", "zeta", "beta", "beta", "alpha", "alpha", "gamma", "gamma"],
                          "fold": [0, 1] * 4, "status": "ok",
                          "auc": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 1.0],
                          "accuracy": [1.0, 1.0, 0.9, 1.0, 0.9, 1.0, 1.0, 1.0]})
    summary = leaderboard.summarise(folds, ("auc", "accuracy"))
    assert summary.index.tolist() == ["zeta", "alpha", "beta", "gamma"]
