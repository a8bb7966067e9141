"""GPU speed of Pixel-Mamba's pieces, our path against the stock mamba-ssm path, on whatever GPU runs it.

    python -m benchmark.perf                                  # every section, every size
    python -m benchmark.perf --sections copy scan --sizes 16M --models 6m
    python -m benchmark.perf --sections step --sizes 4M 16M 32M --append docs/performance.md

Sections:
  copy      the card's copy bandwidth (device-to-device copy, bytes read + written / time); every
            bandwidth below is also given as a fraction of it
  scan      the selective scan at each distinct layer shape of the models (tokens x inner channels for
            2.5x images of the given tissue-pixel counts): forward and forward + backward, time,
            effective bandwidth (bytes that must move / time) and its ratio to the copy bandwidth, for
            our Triton scan and mamba-ssm's kernel side by side
  mixer     the bidirectional Mamba mixer (methods.ssm.mixer.BiMambaMixer) at the same shapes, forward +
            backward from a given output gradient: ours (our CUDA or Triton scan by shape, our
            convolution and token-wise projections) against stock (mamba-ssm's scan, causal-conv1d's
            convolution, cuBLAS), time and effective bandwidth over the bytes its stages must move
            (`mixer_bytes`)
  step      a full training step (forward, backward, AdamW) of pixel_mamba_<model> on one image, with
            and without activation checkpointing: time and peak memory; `--find-max` also searches the
            largest image whose step fits the card
  features  patch-feature extraction throughput of the registered encoders (resnet50_trunc at 224 px,
            conch_v1 at 448 px) in patches/s, compute from patches already on the GPU, random weights

Results print as tables and, with --append FILE, are appended to FILE (Markdown) under a header naming
the card, the commit and the command. Times are medians of CUDA-event timed repeats after a warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

SIZES = {"4M": 4 * 2**20, "16M": 16 * 2**20, "32M": 32 * 2**20}  # tissue pixels at 2.5x
SECTIONS = ("copy", "scan", "mixer", "step", "features")
REGION = 32  # Pixel-Mamba's region side in pixels: an image of P tissue pixels has P / 1024 regions
D_STATE = 16


# ---------------------------------------------------------------------------------------------------
# timing


def median_ms(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms, timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def reps_for(estimate_ms: float, budget_ms: float = 3000.0, most: int = 10) -> int:
    """Repeats that fit a time budget (at least 3, for a median)."""
    return int(max(3, min(most, budget_ms // max(estimate_ms, 1e-3))))


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=20, warmup=3)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class LayerShape:
    model: str
    size: str
    layers: str      # layer ids sharing this (token, channels) shape
    tokens: int      # sequence length entering the first of those layers (after region fusion)
    d_model: int
    channels: int    # inner channels E = expand * d_model

    def row(self, **extra) -> dict:
        """The start of a result row for this shape."""
        return dict(model=self.model, size=self.size, layers=self.layers, tokens=self.tokens,
                    channels=self.channels, **extra)


def layer_shapes(model: str, pixels: int, expand: int = 2, alpha: float = 0.8) -> list[LayerShape]:
    """One entry per distinct (token size, width) of the model's table, with the sequence length of its
    first layer for an image of `pixels` tissue pixels (regions shrink by region fusion per layer)."""
    from methods.pixel_mamba.layers import TABLES
    from methods.pixel_mamba.token_ops import fusion_schedule

    table = TABLES[model]
    regions = pixels // (REGION * REGION)
    fused_before = np.cumsum([0, *fusion_schedule(regions, alpha, len(table))])  # regions gone before layer i
    groups: dict[tuple, list] = {}
    for index, spec in enumerate(table):
        key = (spec.token, spec.channels)
        if key not in groups:
            tokens_per_region = REGION * REGION // (spec.token[0] * spec.token[1])
            groups[key] = [spec.id, spec.id, int(regions - fused_before[index]) * tokens_per_region, spec.channels]
        groups[key][1] = spec.id
    return [LayerShape(model, "", f"{a}-{b}" if a != b else str(a), tokens, width, expand * width)
            for a, b, tokens, width in groups.values()]


def distinct_shapes(models, sizes) -> list[LayerShape]:
    seen, shapes = set(), []
    for size in sizes:
        for model in models:
            for shape in layer_shapes(model, SIZES[size]):
                if (size, shape.tokens, shape.channels) not in seen:
                    seen.add((size, shape.tokens, shape.channels))
                    shapes.append(LayerShape(**{**asdict(shape), "size": size}))
    return shapes


def custom_shape(text: str, expand: int = 2) -> LayerShape:
    try:
        tokens, channels = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape {text!r}: write TOKENSxCHANNELS, e.g. 16777216x6") from None
    if channels % expand:
        raise SystemExit(f"--shape {text!r}: inner channels must be a multiple of expand={expand}")
    return LayerShape("-", "-", "-", tokens, channels // expand, channels)


# ---------------------------------------------------------------------------------------------------
# scan


def scan_bytes(channels: int, tokens: int, io_bytes: int, backward: bool) -> int:
    """Bytes a scan with z, D and delta_bias must move (each input read once, each output written once).
    Forward: u, delta, z, B, C in, y out. Backward: those and dy in, du, ddelta, dz, dB, dC out."""
    per_token = (3 * channels + 2 * D_STATE + channels) * io_bytes
    if backward:
        per_token += (4 * channels + 2 * D_STATE + 3 * channels + 2 * D_STATE) * io_bytes
    return per_token * tokens


def scan_inputs(channels: int, tokens: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs shaped like a Pixel-Mamba layer's (A as in Mamba's S4D-real init)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype).requires_grad_(True)

    A = -torch.arange(1, D_STATE + 1, device="cuda", dtype=torch.float32).repeat(channels, 1)
    bias = torch.log(torch.expm1(torch.rand(channels, device="cuda", generator=gen) * 0.099 + 0.001))
    return dict(u=draw(1, channels, tokens), delta=draw(1, channels, tokens, scale=0.5),
                A=A.requires_grad_(True), B=draw(1, D_STATE, tokens), C=draw(1, D_STATE, tokens),
                D=torch.ones(channels, device="cuda", requires_grad=True), z=draw(1, channels, tokens),
                delta_bias=bias.requires_grad_(True))


def scan_paths() -> dict:
    """ours: the Triton scan; cuda_sp: the CUDA scan beside it, where it builds. "auto" picks one of the
    two by shape (methods/ssm/backends_gpu.py), so both are timed."""
    paths = {}
    try:
        from methods.ssm import cuda_scan
        from methods.ssm.triton_scan import selective_scan_triton
        paths["ours"] = selective_scan_triton
        if cuda_scan.extension() is not None:
            paths["cuda_sp"] = cuda_scan.selective_scan_cuda_sp
    except ImportError as err:
        print(f"[scan] our scans unavailable: {err}", file=sys.stderr)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        paths["stock"] = selective_scan_fn
    except ImportError as err:
        print(f"[scan] mamba-ssm unavailable, stock path skipped: {err}", file=sys.stderr)
    return paths


def bench_scan(shapes, dtype, copy_gbs, paths=None) -> list[dict]:
    paths = paths or scan_paths()
    rows = []
    io_bytes = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        ins = scan_inputs(shape.channels, shape.tokens, dtype)
        dout = torch.randn(1, shape.channels, shape.tokens, device="cuda", dtype=dtype)
        row = shape.row(dtype=str(dtype).replace("torch.", ""))
        for name, fn in paths.items():
            def forward():
                with torch.no_grad():
                    fn(**ins, delta_softplus=True)

            def forward_backward():
                # autograd.grad: the gradients are returned, not added into .grad (that addition is
                # the benchmark's work, not the scan's: 1-2 ms at 6 x 16.8 M)
                out = fn(**ins, delta_softplus=True)
                torch.autograd.grad(out, list(ins.values()), dout)

            first = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            estimate = (time.perf_counter() - first) * 1e3
            for label, run, backward in (("fwd", forward, False), ("fwd+bwd", forward_backward, True)):
                ms = median_ms(run, reps=reps_for(estimate * (3 if backward else 1)))
                gbs = scan_bytes(shape.channels, shape.tokens, io_bytes, backward) / (ms * 1e-3) / 1e9
                row[f"{name} {label} ms"] = round(ms, 3)
                row[f"{name} {label} GB/s"] = round(gbs, 1)
                if copy_gbs:
                    row[f"{name} {label} of copy"] = round(gbs / copy_gbs, 3)
        if "ours" in paths and "stock" in paths:
            row["speedup fwd+bwd"] = round(row["stock fwd+bwd ms"] / row["ours fwd+bwd ms"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del ins, dout
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# mixer and training step (models from methods/pixel_mamba, the mixer from methods/ssm/mixer)


@contextlib.contextmanager
def scan_path(path: str):
    """'ours': our kernels registered (auto picks them where they are faster); 'stock': mamba-ssm's."""
    from methods.ssm import backends_gpu

    backends_gpu.register()
    if path == "stock":
        with backends_gpu.triton_disabled():
            yield
    else:
        yield


def mixer_bytes(d_model: int, channels: int, dt_rank: int, tokens: int, io_bytes: int,
                branches: int = 2) -> int:
    """Bytes the bidirectional mixer's stages must move for forward + backward, each stage reading its
    inputs once and writing its outputs once: forward in + out; backward its saved inputs and its
    output gradient in, its input gradients out (2 in + out; for the scan this is scan_bytes' count).
    Stages (widths per token): in_proj d -> 2E; per branch conv E -> E, x_proj E -> R + 2N, dt_proj
    R -> E, scan (u, delta, z, B, C) 3E + 2N -> E; out_proj E -> d. The flips and the branch average
    are not counted (a fused mixer needs neither)."""
    E, N, R = channels, D_STATE, dt_rank
    branch = [(E, E), (E, R + 2 * N), (R, E), (3 * E + 2 * N, E)]
    stages = [(d_model, 2 * E), *branch * branches, (E, d_model)]
    per_token = sum(3 * inp + 2 * out for inp, out in stages)  # forward in + out, backward 2 in + out
    return per_token * tokens * io_bytes


def bench_mixer(shapes, dtype, copy_gbs=None, paths=("ours", "stock")) -> list[dict]:
    from methods.ssm.mixer import BiMambaMixer

    rows = []
    io_bytes = torch.empty((), dtype=dtype).element_size()
    for shape in shapes:
        mixer = BiMambaMixer(shape.d_model, d_state=D_STATE).cuda()
        x = torch.randn(1, shape.tokens, shape.d_model, device="cuda", requires_grad=True)
        leaves = [x, *mixer.parameters()]
        # the output's gradient comes given, as from the layer above: no loss kernels inside the timing
        dout = torch.randn(1, shape.tokens, shape.d_model, device="cuda", dtype=dtype)
        nbytes = mixer_bytes(shape.d_model, shape.channels, mixer.dt_rank, shape.tokens, io_bytes)
        row = shape.row(autocast=str(dtype).replace("torch.", ""))
        for path in paths:
            def step():
                with torch.autocast("cuda", dtype=dtype):
                    out = mixer(x)
                torch.autograd.grad(out, leaves, dout.to(out.dtype))

            with scan_path(path):
                ms = median_ms(step, reps=3)
            row[f"{path} fwd+bwd ms"] = round(ms, 2)
            gbs = nbytes / (ms * 1e-3) / 1e9
            row[f"{path} GB/s"] = round(gbs, 1)
            if copy_gbs:
                row[f"{path} of copy"] = round(gbs / copy_gbs, 3)
        if len(paths) == 2:
            row["speedup"] = round(row["stock fwd+bwd ms"] / row["ours fwd+bwd ms"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del mixer, x, dout
        torch.cuda.empty_cache()
    return rows


def random_image(pixels: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    regions = pixels // (REGION * REGION)
    return torch.randint(0, 256, (regions, REGION, REGION, 3), device="cuda", dtype=torch.uint8,
                         generator=gen)


def training_step_fn(model_name: str, pixels: int, checkpointing: bool, dtype):
    """A closure running one training step (forward, backward, AdamW) of the model on a random image."""
    from methods.pixel_mamba.model import pixel_mamba

    model = pixel_mamba(model_name, n_classes=2, checkpoint_layers=checkpointing).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = random_image(pixels)
    target = torch.tensor([1], device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            logits = model(image)
        torch.nn.functional.cross_entropy(logits.float(), target).backward()
        optimizer.step()

    return step


def profile_step(model_name: str, size: str, dtype, path: str, top: int = 15) -> None:
    """Print the GPU kernels that take the most time in one training step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with scan_path(path):
        step = training_step_fn(model_name, SIZES[size], False, dtype)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    print(f"[profile] pixel_mamba_{model_name} {size} {path} path")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    print(tabulate_ops(sorted(ops, key=lambda e: -e.device_time_total)[:top]))


def tabulate_ops(events) -> str:
    """aten ops by the GPU time of the kernels they launch (children included)."""
    from tabulate import tabulate

    return tabulate([[e.key, e.count, round(e.device_time_total / 1e3, 1)] for e in events],
                    headers=["aten op", "calls", "GPU ms (incl. children)"])


def bench_step(models, sizes, dtype, paths=("ours", "stock"), checkpointing=(False, True)) -> list[dict]:
    rows = []
    for model_name in models:
        for size in sizes:
            for ckpt in checkpointing:
                row = dict(model=f"pixel_mamba_{model_name}", size=size, checkpointing=ckpt,
                           autocast=str(dtype).replace("torch.", ""))
                for path in paths:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    try:
                        with scan_path(path):
                            step = training_step_fn(model_name, SIZES[size], ckpt, dtype)
                            ms = median_ms(step, reps=2)
                        row[f"{path} step ms"] = round(ms, 1)
                        row[f"{path} peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    except torch.OutOfMemoryError:
                        row[f"{path} step ms"] = "OOM"
                    step = None
                if all(isinstance(row.get(f"{p} step ms"), float) for p in paths) and len(paths) == 2:
                    row["speedup"] = round(row["stock step ms"] / row["ours step ms"], 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def largest_fitting_image(model_name: str, dtype, start_pixels: int, checkpointing: bool = True,
                          factor: float = 1.25, limit: int = 512 * 2**20) -> list[dict]:
    """Grow the image by `factor` until a training step runs out of GPU memory."""
    rows, pixels = [], start_pixels
    while pixels <= limit:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            with scan_path("ours"):
                step = training_step_fn(model_name, pixels, checkpointing, dtype)
                step()
                torch.cuda.synchronize()
            row = dict(model=f"pixel_mamba_{model_name}", megapixels=round(pixels / 2**20, 1),
                       checkpointing=checkpointing, fits=True,
                       peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        except torch.OutOfMemoryError:
            row = dict(model=f"pixel_mamba_{model_name}", megapixels=round(pixels / 2**20, 1),
                       checkpointing=checkpointing, fits=False, peak_GiB=None)
        step = None
        print(json.dumps(row), flush=True)
        rows.append(row)
        if not row["fits"]:
            break
        pixels = int(pixels * factor) // (REGION * REGION) * REGION * REGION
    return rows


# ---------------------------------------------------------------------------------------------------
# patch features


def bench_features(batch: int = 256) -> list[dict]:
    """Patches/s of the registered patch encoders (random weights: compute only) on patches already on
    the GPU, at their own input size (ResNet-50-trunc 224 px, CONCH 448 px)."""
    from methods.encoders import create_encoder

    rows = []
    for name in ("resnet50_trunc", "conch_v1"):
        encoder = create_encoder(name, weights="random").cuda().eval()
        side = encoder.preprocess.input_size
        for precision in ("fp32", "bf16"):
            x = torch.randn(batch, 3, side, side, device="cuda")

            def run():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                             enabled=precision == "bf16"):
                    encoder(x)

            ms = median_ms(run, reps=5, warmup=2)
            row = dict(encoder=f"{name} ({side} px)", precision=precision, batch=batch,
                       patches_per_s=round(batch / ms * 1e3))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# report


def card_name() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"


def current_commit() -> str:
    if os.environ.get("WSI_BENCH_COMMIT"):
        return os.environ["WSI_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(rows: list[dict]) -> str:
    from tabulate import tabulate

    columns = list(dict.fromkeys(k for row in rows for k in row))
    return tabulate([[row.get(c, "") for c in columns] for row in rows], headers=columns, tablefmt="github")


def report(results: dict[str, list[dict]], header: str, append: Path | None) -> None:
    text = [header]
    for section, rows in results.items():
        if rows:
            text += [f"\n**{section}**\n", markdown_table(rows)]
    body = "\n".join(text) + "\n"
    print(body)
    if append:
        with open(append, "a") as f:
            f.write("\n" + body)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--models", nargs="+", choices=("6m", "21m"), default=["6m", "21m"])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="scan input dtype / autocast dtype of mixer and step (default bf16)")
    parser.add_argument("--max-channels", type=int, default=None,
                        help="scan / mixer: only shapes with at most this many inner channels")
    parser.add_argument("--shape", action="append", default=[], metavar="TOKENSxCHANNELS",
                        help="scan / mixer: time this (tokens x inner channels) shape instead of the "
                             "models' layers, e.g. 16777216x6 (repeatable)")
    parser.add_argument("--paths", nargs="+", choices=("ours", "stock"), default=["ours", "stock"])
    parser.add_argument("--no-checkpointing", action="store_true", help="step: skip the checkpointed runs")
    parser.add_argument("--find-max", action="store_true",
                        help="step: also search the largest image that fits (pixel_mamba_6m, checkpointed)")
    parser.add_argument("--find-max-from", type=float, default=32.0, metavar="MEGAPIXELS",
                        help="step --find-max: first image size tried (default 32); the search uses "
                             "activation checkpointing unless --no-checkpointing")
    parser.add_argument("--find-max-factor", type=float, default=1.5,
                        help="step --find-max: growth factor between tries (default 1.5)")
    parser.add_argument("--profile", action="store_true",
                        help="step: print the top GPU kernels of one step per model and size (our path)")
    parser.add_argument("--append", type=Path, default=None, help="append the Markdown results to this file")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.perf measures GPU speed: run it on a machine with a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results: dict[str, list[dict]] = {}
    copy_gbs = None
    if {"copy", "scan", "mixer"} & set(args.sections):
        copy_gbs = measure_copy_bandwidth()
        results["copy"] = [dict(copy_GB_per_s=round(copy_gbs, 1))]
        print(json.dumps(results["copy"][0]), flush=True)
    shapes = []
    if {"scan", "mixer"} & set(args.sections):
        shapes = [custom_shape(text) for text in args.shape] or distinct_shapes(args.models, args.sizes)
        shapes = [s for s in shapes if args.max_channels is None or s.channels <= args.max_channels]
    if "scan" in args.sections:
        all_paths = scan_paths()
        results["scan"] = bench_scan(shapes, dtype, copy_gbs,
                                     {k: v for k, v in all_paths.items()
                                      if k in args.paths or k not in ("ours", "stock")})
    if "mixer" in args.sections:
        results["mixer"] = bench_mixer(shapes, dtype, copy_gbs, tuple(args.paths))
    if "step" in args.sections:
        checkpointing = (False,) if args.no_checkpointing else (False, True)
        results["step"] = bench_step(args.models, args.sizes, dtype, tuple(args.paths), checkpointing)
        if args.profile:
            for model_name in args.models:
                for size in args.sizes:
                    profile_step(model_name, size, dtype, args.paths[0])
        if args.find_max:
            results["largest image"] = largest_fitting_image(
                "6m", dtype, int(args.find_max_from * 2**20), checkpointing=not args.no_checkpointing,
                factor=args.find_max_factor)
    if "features" in args.sections:
        results["features"] = bench_features()
    command = "python -m benchmark.perf " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"### {time.strftime('%Y-%m-%d %H:%M')} | {card_name()} | commit {current_commit()} | "
              f"torch {torch.__version__}\n\n`{command}`")
    report(results, header, args.append)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
