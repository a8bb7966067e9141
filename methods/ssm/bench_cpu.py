"""CPU time and peak memory of the SSM op layer's reference path, forward + backward.

    python -m methods.ssm.bench_cpu [--tokens 1000000] [--threads 2]

Cases: a selective scan over `tokens` tokens with 6 channels and d_state 16 (Pixel-Mamba's first layer
after in_proj), and a BiMambaMixer(d_model=3) over `tokens` tokens (its first layer). Each case runs in
a fresh process so that its peak RSS (resource.getrusage) is its own; the table also gives the size the
(L, E, N) state tensor would have had, which the reference path never materialises.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = ("scan", "mixer")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _scan_step(tokens: int):
    from methods.ssm import selective_scan

    channels, state = 6, 16
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(*shape, generator=g).requires_grad_(True) for shape in
              ((1, channels, tokens), (1, channels, tokens), (1, state, tokens), (1, state, tokens))]
    u, delta, B, C = leaves
    A = (-torch.arange(1.0, state + 1).repeat(channels, 1)).requires_grad_(True)

    def step():
        y = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="reference")
        y.square().mean().backward()

    return step, tokens * channels * state


def _mixer_step(tokens: int):
    from methods.ssm import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(d_model=3, backend="reference")
    x = torch.randn(1, tokens, 3, requires_grad=True)

    def step():
        mixer(x).square().mean().backward()

    return step, 2 * tokens * mixer.d_inner * mixer.d_state  # both directions


def run_case(case: str, tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    step, state_numel = (_scan_step if case == "scan" else _mixer_step)(tokens)
    before = _peak_rss_mib()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return {"case": case, "tokens": tokens, "threads": threads, "fwd+bwd s": round(seconds, 2),
            "peak RSS MiB": round(_peak_rss_mib()), "RSS before step MiB": round(before),
            "(L, E, N) fp32 MiB": round(state_numel * 4 / 2**20)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--case", choices=CASES, help="run one case in this process and print it as JSON")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.threads)))
        return
    from tabulate import tabulate

    rows = []
    for case in CASES:
        done = subprocess.run([sys.executable, "-m", "methods.ssm.bench_cpu", "--case", case, "--tokens",
                               str(args.tokens), "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
