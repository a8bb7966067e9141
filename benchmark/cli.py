"""Command line: `python run_benchmark.py --method M[,M...]|all --dataset D [...]`.

Prints what it will do, runs the jobs, and ends by saying where results and leaderboards are."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmark.registry import AGGREGATORS, DATASETS, ENCODERS, METHODS, UnknownNameError, load_all

EXIT_OK, EXIT_FAILED_JOBS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_benchmark.py", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", action="store_true", help="list registered methods, datasets and encoders")
    p.add_argument("--method", help="method name(s), comma-separated, or 'all'")
    p.add_argument("--dataset", help="dataset (cohort) name")
    p.add_argument("--task", help="task of the dataset (default: the dataset's default task)")
    p.add_argument("--folds", type=int, default=5, help="number of cross-validation folds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one job per fold and seed)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of generated splits and of the synthetic cohort")
    p.add_argument("--splits", default="default", help="'default' (shipped where the cohort has them), 'generate', or a folder of CLAM-style split CSVs")
    p.add_argument("--gpus", default="", help="GPU ids ('0,1,2,3') or 'all'; empty runs on the CPU")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder for results, quarantine reports and provenance")
    p.add_argument("--leaderboard-dir", type=Path, default=Path("leaderboards"), help="where Markdown/CSV leaderboards go")
    p.add_argument("--data-root", type=Path, help="folder with the cohort's slides (synthetic: where to generate them)")
    p.add_argument("--cache-dir", type=Path, help="cache of slide products and features (default: the user cache dir)")
    p.add_argument("--max-epochs", type=int, help="cap every method's recipe at this many epochs (smoke runs, demo)")
    p.add_argument("--weights", help="pretrained weights: 'hub', a local path, 'hf:REPO', or 'random' (offline; flagged)")
    p.add_argument("--preset", help="a named set of method settings (e.g. 'demo' for the synthetic cohort)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method setting (repeatable), e.g. --set lr=1e-4")
    p.add_argument("--default-mpp", type=float, help="microns per pixel for slides that carry none")
    p.add_argument("--strict", action="store_true", help="make the first bad slide or failed job fatal")
    p.add_argument("--workers", type=int, default=0, help="worker processes for slide reading")
    p.add_argument("--dry-run", action="store_true", help="print the job plan and exit")
    p.add_argument("--leaderboard", action="store_true", help="rebuild leaderboards from the results in --out and exit")
    p.add_argument("--combine", nargs="*", metavar="DATASET:TASK",
                   help="with --leaderboard: also write leaderboards/combined.md and .tex over these tables (none: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                   help="import this module first (it registers extra methods/datasets); job processes import it too")
    g = p.add_argument_group("scheduling (docs/scheduling.md)")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: this machine (one process per job with --gpus); slurm: job arrays through submitit")
    g.add_argument("--cpu-jobs", type=int, default=0,
                   help="local launcher without --gpus: run N jobs at a time in their own processes (0: one after another in this process)")
    g.add_argument("--gpus-per-job", type=int,
                   help="GPUs per job (default: the method's own, 1 for most); slurm: 0 runs CPU jobs")
    g.add_argument("--retry-oom", action="store_true",
                   help="retry a job that ran out of GPU memory once, with the method's memory-saving settings")
    g.add_argument("--partition", help="slurm partition")
    g.add_argument("--time", help="slurm time limit per job, e.g. 4:00:00 (jobs that hit it are requeued and resume)")
    g.add_argument("--account", help="slurm account")
    g.add_argument("--sbatch-flag", dest="sbatch_flags", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option (repeatable), e.g. --sbatch-flag qos=high --sbatch-flag cpus-per-task=8")
    return p.parse_args(argv)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def print_registries() -> None:
    for registry in (METHODS, DATASETS, ENCODERS, AGGREGATORS):
        print(f"{registry.kind}s:")
        for entry in registry:
            print(f"  {entry.name:<24} {entry.description}")
        print()


def resolve_gpus_and_device(args: argparse.Namespace) -> tuple[list[int], str]:
    """GPU ids of the local launcher and the device jobs run on."""
    if args.launcher == "slurm":
        if args.gpus:
            raise ValueError("--gpus picks GPUs of this machine (local launcher); with slurm use --gpus-per-job")
        return [], "cpu" if args.gpus_per_job == 0 else "cuda"
    from benchmark.launchers.local import resolve_gpus

    gpus = resolve_gpus(args.gpus)
    return gpus, "cuda" if gpus else "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_all()
    from benchmark.runner import load_plugins

    try:
        load_plugins(args.plugins)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.list:
        print_registries()
        return EXIT_OK
    if args.leaderboard or args.combine is not None:
        from benchmark import combine, leaderboard
        from benchmark.results import iter_results

        records = list(iter_results(args.out))  # read once for the leaderboards and the combined table
        paths = leaderboard.build(args.out, args.leaderboard_dir, records)
        if not paths:
            print(f"no results under {args.out / 'results'}; run a benchmark first", file=sys.stderr)
            return EXIT_USAGE
        if args.combine is not None:
            try:
                paths += combine.write_combined(records, args.leaderboard_dir, args.combine)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return EXIT_USAGE
        print("\n".join(f"leaderboard: {p}" for p in paths))
        return EXIT_OK
    if not args.method or not args.dataset:
        print("give --method and --dataset (or --list / --leaderboard); --help shows all options", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_from_args(args, argv)
    except (UnknownNameError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished results are kept under {args.out / 'results'}; "
              "run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    from benchmark.runner import RunOptions, make_plan, run

    methods = METHODS.names() if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    for name in methods:
        METHODS.get(name)
    DATASETS.get(args.dataset)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected KEY=VALUE")
        overrides[key] = parse_value(value)
    gpus, device = resolve_gpus_and_device(args)
    opts = RunOptions(methods=methods, dataset=args.dataset, task=args.task, n_folds=args.folds, seeds=args.seeds,
                      out_dir=args.out, cache_dir=args.cache_dir, data_root=args.data_root,
                      leaderboard_dir=args.leaderboard_dir, max_epochs=args.max_epochs, weights=args.weights,
                      splits=args.splits, split_seed=args.split_seed, strict=args.strict,
                      default_mpp=args.default_mpp, workers=args.workers, device=device,
                      preset=args.preset, overrides=overrides, progress=not args.no_progress,
                      plugins=args.plugins, launcher=args.launcher, gpus=gpus, cpu_jobs=args.cpu_jobs,
                      gpus_per_job=args.gpus_per_job, retry_oom=args.retry_oom, partition=args.partition,
                      time=args.time, account=args.account, sbatch_flags=args.sbatch_flags)
    state = make_plan(opts)
    todo = [p for p in state.planned if not p.done]
    print(f"plan: {len(state.planned)} jobs ({len(methods)} methods x {len(state.folds)} folds x {len(args.seeds)} seeds) "
          f"on {args.dataset}/{state.task.name} ({len(state.cohort.slides)} slides); "
          f"{len(state.planned) - len(todo)} already done, {len(todo)} to run on {opts.device}")
    if args.dry_run:
        for p in state.planned:
            print(f"  {'done' if p.done else 'todo'}  {p.job.name}  config {p.config_hash}")
        return EXIT_OK
    summary = run(opts, state, argv=["run_benchmark.py", *argv])
    print(f"results: {args.out / 'results'}")
    for path in summary.leaderboards:
        print(f"leaderboard: {path}")
    if summary.failed:
        print(f"{len(summary.failed)} jobs failed:", file=sys.stderr)
        for name, error in summary.failed.items():
            print(f"  {name}: {error.splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED_JOBS
    return EXIT_OK
