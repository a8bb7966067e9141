"""The spine end to end on a toy cohort: plan, results, resume, failures, leaderboards."""
import json

import numpy as np
import pandas as pd
import pytest

from benchmark import cli
from benchmark.registry import METHODS, Entry
from benchmark.results import iter_results
from benchmark.runner import RunOptions, make_plan, run
from tests.toy import ToyMethod, leaderboard_text


def opts(tmp_path, **kw):
    base = dict(methods=["toy", "toy2"], dataset="toy", n_folds=5, out_dir=tmp_path / "out",
                leaderboard_dir=tmp_path / "lb", cache_dir=tmp_path / "cache", progress=False)
    base.update(kw)
    return RunOptions(**base)


def test_run_writes_results_and_leaderboard(tmp_path, toy_registries):
    summary = run(opts(tmp_path))
    assert len(summary.ran) == 10 and not summary.failed
    records = list(iter_results(tmp_path / "out"))
    assert len(records) == 10 and all(r["status"] == "ok" for r in records)
    r = records[0]
    assert r["config_hash"] and r["git_commit"] and "torch" in r["versions"] and r["predictions"]
    # the Markdown table's numbers equal mean and sample std of the per-fold AUCs in the result files
    aucs = sorted(x["metrics"]["auc"] for x in records if x["job"]["method"] == "toy")
    md = (tmp_path / "lb" / "toy_binary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| toy "))
    assert f"{np.mean(aucs):.4f} ± {np.std(aucs, ddof=1):.4f}" in row
    assert "5 folds" in md and "`val` partition" in md
    # cost: mean of train_s / n_train_slides over folds (2k/4 for k = 1..5) and infer_s / n_infer_slides
    assert row.rstrip(" |").endswith("cpu 1.5 · 0.125 · " + format(max(x["cost"]["peak_rss_gb"] for x in records if x["job"]["method"] == "toy"), ".3g"))
    csv = pd.read_csv(tmp_path / "lb" / "toy_binary.csv")
    assert sorted(csv.loc[csv["method"] == "toy", "auc"]) == pytest.approx(aucs)


def test_rerun_skips_finished_jobs_and_config_change_reruns(tmp_path, toy_registries):
    run(opts(tmp_path))
    assert run(opts(tmp_path)).ran == []
    again = run(opts(tmp_path, overrides={"noise": 0.5}))
    assert len(again.ran) == 10  # a changed setting changes every job's config hash


def test_failed_job_is_recorded_and_others_finish(tmp_path, toy_registries, monkeypatch):
    monkeypatch.setitem(METHODS._entries, "toy", Entry("toy", "", lambda **kw: ToyMethod(fail_on_fold=2, **kw)))
    summary = run(opts(tmp_path, methods=["toy"]))
    assert list(summary.failed) == ["toy/toy/binary/fold2/seed0"]
    assert "out of memory" in summary.failed["toy/toy/binary/fold2/seed0"]
    failed = json.loads((tmp_path / "out/results/toy/binary/toy/fold2_seed0.json").read_text())
    assert failed["status"] == "failed" and "Traceback" in failed["traceback"]
    md = (tmp_path / "lb" / "toy_binary.md").read_text()
    assert "toy fold 2 seed 0 failed: RuntimeError: CUDA out of memory" in md
    assert "| toy " in md and "| 4 " in md.replace("|     4 ", "| 4 ")  # 4 folds made it


def test_interrupted_run_resumes_to_the_same_leaderboard(tmp_path, toy_registries, monkeypatch):
    reference = run(opts(tmp_path / "ref"))
    monkeypatch.setitem(METHODS._entries, "toy", Entry("toy", "", lambda **kw: ToyMethod(interrupt_after=3, **kw)))
    with pytest.raises(KeyboardInterrupt):
        run(opts(tmp_path / "cut"))
    assert len(list(iter_results(tmp_path / "cut" / "out"))) == 3
    monkeypatch.setitem(METHODS._entries, "toy", Entry("toy", "", ToyMethod))
    resumed = run(opts(tmp_path / "cut"))
    assert len(resumed.ran) == 7  # only the jobs that had not finished
    # identical but for the measured cost (peak memory differs between processes)
    ref_md = leaderboard_text(reference.leaderboards[0])
    assert "<cost>" in ref_md and leaderboard_text(resumed.leaderboards[0]) == ref_md


def test_survival_task_leaderboard(tmp_path, toy_registries):
    summary = run(opts(tmp_path, methods=["toy"], task="survival"))
    assert not summary.failed
    md = (tmp_path / "lb" / "toy_survival.md").read_text()
    assert "C-index" in md and "(survival)" in md


def test_dry_run_plans_without_running(tmp_path, toy_registries, capsys):
    code = cli.main(["--method", "toy", "--dataset", "toy", "--folds", "3", "--seeds", "0", "1", "--dry-run",
                     "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert code == 0 and "plan: 6 jobs" in out and out.count("todo  toy/toy/binary/fold") == 6
    assert not (tmp_path / "out").exists()


def test_unknown_names_exit_2_with_closest(tmp_path, toy_registries, capsys):
    assert cli.main(["--method", "toyy", "--dataset", "toy"]) == 2
    assert "unknown method 'toyy' (closest: toy" in capsys.readouterr().err
    assert cli.main(["--method", "toy", "--dataset", "tyo"]) == 2
    assert "unknown dataset 'tyo'" in capsys.readouterr().err


def test_cli_exit_code_names_failed_jobs(tmp_path, toy_registries, monkeypatch, capsys):
    monkeypatch.setitem(METHODS._entries, "toy", Entry("toy", "", lambda **kw: ToyMethod(fail_on_fold=0, **kw)))
    code = cli.main(["--method", "toy", "--dataset", "toy", "--folds", "2", "--no-progress",
                     "--out", str(tmp_path / "out"), "--leaderboard-dir", str(tmp_path / "lb"),
                     "--cache-dir", str(tmp_path / "c")])
    assert code == 1
    assert "toy/toy/binary/fold0/seed0: RuntimeError" in capsys.readouterr().err
    # the leaderboard is rebuilt from the results alone
    (tmp_path / "lb" / "toy_binary.md").unlink()
    assert cli.main(["--leaderboard", "--out", str(tmp_path / "out"), "--leaderboard-dir", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "toy_binary.md").exists()


def test_run_saves_its_folds_for_reuse(tmp_path, toy_registries):
    from datasets.splits import read_split_dir

    run(opts(tmp_path, methods=["toy"], n_folds=3))
    saved = read_split_dir(tmp_path / "out" / "splits" / "toy" / "binary")
    state = make_plan(opts(tmp_path, methods=["toy"], n_folds=3))
    assert [(f.train, f.val) for f in saved] == [(f.train, f.val) for f in state.folds]


def test_plan_uses_audited_patient_level_folds(tmp_path, toy_registries):
    state = make_plan(opts(tmp_path))
    vals = [set(f.val) for f in state.folds]
    assert set().union(*vals) == set(state.cohort.slides["patient_id"])
    assert sum(len(v) for v in vals) == 30
