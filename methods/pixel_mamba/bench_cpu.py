"""Time and peak memory of Pixel-Mamba training steps on the CPU (a benchmark script, not a test).

    python -m methods.pixel_mamba.bench_cpu --tokens 1000000          # the issue's 10^6-token check
    python -m methods.pixel_mamba.bench_cpu --tokens 20000 --steps 3  # the synthetic demo's slide size

Each step is forward + backward + AdamW on random pixels of tokens/1024 regions of 32 x 32. Printed per
step: wall time and the process's CPU time (user + system: on a shared machine, CPU time with
--threads 1 is the figure that other jobs do not inflate), and the peak resident set (ru_maxrss), with
the resident set before the first step.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from methods.pixel_mamba.model import pixel_mamba


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m methods.pixel_mamba.bench_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="pixel tokens (rounded down to whole 32x32 regions)")
    parser.add_argument("--size", default="6m", choices=("6m", "21m"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--checkpoint-layers", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_regions = max(1, args.tokens // 1024)
    torch.manual_seed(0)
    model = pixel_mamba(args.size, 2, checkpoint_layers=args.checkpoint_layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randint(0, 256, (n_regions, 32, 32, 3), dtype=torch.uint8)
    print(f"pixel_mamba_{args.size}: {n_regions} regions = {n_regions * 1024:,} tokens, "
          f"{torch.get_num_threads()} threads, checkpointing {'on' if args.checkpoint_layers else 'off'}; "
          f"resident before: {peak_rss_mib():.0f} MiB")
    for step in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(model(pixels), torch.tensor([step % 2]))
        forward = time.perf_counter() - start
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: forward {forward:.2f} s, forward+backward+update {time.perf_counter() - start:.2f} s "
              f"(CPU time {time.process_time() - cpu_start:.2f} s), peak resident {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
