"""Time the slide stage on the synthetic cohort twice: the second pass must find everything cached.

    python -m benchmark.preprocess_bench [--cache-dir DIR] [--workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmark.registry import DATASETS, load_all
from datasets.preprocess import preprocess_slides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, help="default: a fresh temporary folder (a cold first pass)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    load_all()
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        cohort = DATASETS.create("synthetic", data_root=None, cache_dir=cache, seed=0)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            preprocess_slides(cohort.slides, cache, products=("tissue", "patches", "lowres"),
                              tissue=cohort.tissue_params(), workers=args.workers, progress=False)
            seconds.append(time.perf_counter() - start)
    print(f"synthetic cohort, {len(cohort.slides)} slides, tissue + patches + 2.5x images, {args.workers} workers")
    print(f"first pass {seconds[0]:.2f} s, second pass {seconds[1]:.3f} s ({100 * seconds[1] / seconds[0]:.1f}% of the first)")


if __name__ == "__main__":
    main()
