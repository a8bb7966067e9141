"""Training one model on several GPUs (torch.distributed, DDP), with the same math as one process.

The launchers start one process per GPU with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and join the process group before the job runs (NCCL on GPUs, gloo on the
CPU). A trainer then only needs:

    world = distributed.world()
    model = distributed.wrap_model(model.to(device), world)      # DDP when world.size > 1
    for epoch in ...:
        order = [samples[i] for i in rng.permutation(len(samples))]  # same seed on every rank
        loss = distributed.train_steps(model, order, loss_fn, optimizer, effective_batch, world,
                                       on_step=scheduler.step)

`train_steps` gives each rank one slide per micro-step, accumulates gradients without synchronising
them (`no_sync`) until the last micro-step of an optimizer step, and weights each loss so that the
optimizer sees the mean gradient over the `effective_batch` slides of the step, whatever the number
of GPUs. See docs/scheduling.md for the contract.

`python -m benchmark.distributed --bench --gpus 1,2` times a Pixel-Mamba training step on 1 and 2 GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the process group (a world of one when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def init_from_env(device: str) -> World:
    """Join the process group that torchrun's environment describes: NCCL for CUDA, gloo for the CPU.
    Without WORLD_SIZE (or with 1) this is a single process and joins nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, world_: World | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around the model when there are several ranks (its parameters are broadcast from rank 0)."""
    world_ = world_ or world()
    if world_.size == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_cuda else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def step_schedule(n_samples: int, effective_batch: int, world_: World) -> list[list[tuple[int, float]]]:
    """This rank's work: per optimizer step, one (sample index, loss weight) per micro-step.

    The samples of a step are dealt round robin over the ranks. Every rank does the same number of
    micro-steps per step (DDP needs every rank in every gradient all-reduce): a rank with fewer
    samples repeats one with weight 0, which adds nothing to the gradient. A real sample weighs
    world / n (DDP averages over ranks), so the optimizer sees the mean over the step's n samples,
    exactly as one process accumulating n samples with weight 1 / n."""
    if effective_batch < 1:
        raise ValueError(f"effective_batch must be >= 1, got {effective_batch}")
    steps = []
    for start in range(0, n_samples, effective_batch):
        batch = list(range(start, min(n_samples, start + effective_batch)))
        mine = batch[world_.rank::world_.size]
        micro_steps = math.ceil(len(batch) / world_.size)
        padding = [(mine[0] if mine else batch[0], 0.0)] * (micro_steps - len(mine))
        steps.append([(index, world_.size / len(batch)) for index in mine] + padding)
    return steps


def train_steps(model: nn.Module, samples: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                optimizer: torch.optim.Optimizer, effective_batch: int, world_: World | None = None, *,
                on_step: Callable[[], Any] | None = None, clip_grad_norm: float | None = None) -> float:
    """One pass over `samples` (already in this epoch's order, the same order on every rank): one
    optimizer step per `effective_batch` samples (the last step may have fewer), gradient all-reduce
    only on the last micro-step of each step. `loss_fn(model, sample)` returns the scalar loss of one
    sample (it moves the sample to the device and runs the forward pass, autocast included).
    `on_step` runs after each optimizer step (a scheduler's `step`). Returns the mean loss over all
    samples of all ranks (the same number on every rank)."""
    world_ = world_ or world()
    if world_.size > 1 and not isinstance(model, DistributedDataParallel):
        raise ValueError("train_steps on several ranks needs the model wrapped by distributed.wrap_model")
    total, count = None, 0
    for step in step_schedule(len(samples), effective_batch, world_):
        for micro, (index, weight) in enumerate(step):
            last = micro == len(step) - 1
            with nullcontext() if last or world_.size == 1 else model.no_sync():
                loss = loss_fn(model, samples[index])
                (loss * weight).backward()
            if weight:
                total = loss.detach().float() + (0 if total is None else total)
                count += 1
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()
    if total is None:
        return float("nan")
    summed = torch.stack([total, torch.tensor(float(count), device=total.device)])
    if world_.size > 1:
        dist.all_reduce(summed)
    return float(summed[0] / summed[1])


def broadcast(obj: Any, world_: World | None = None) -> Any:
    """Rank 0's `obj` on every rank (a decision only rank 0 can take, e.g. after taking a lock)."""
    world_ = world_ or world()
    if world_.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[Any], world_: World | None = None) -> list[Any]:
    """This rank's share of `items` (round robin), e.g. patients to score."""
    world_ = world_ or world()
    return list(items[world_.rank::world_.size])


def gather(items: list[Any], world_: World | None = None) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank (picklable objects)."""
    world_ = world_ or world()
    if world_.size == 1:
        return list(items)
    parts: list[Any] = [None] * world_.size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


# ---- benchmark: time per optimizer step on N GPUs against one -----------------------------------------
def _bench_model(name: str, n_classes: int = 2) -> nn.Module:
    if name == "mlp":  # a stand-in that runs anywhere (smoke test of this script)
        return nn.Sequential(nn.Flatten(0), nn.LazyLinear(64), nn.ReLU(), nn.Linear(64, n_classes))
    try:
        from methods.pixel_mamba.model import pixel_mamba
    except ImportError as err:
        raise RuntimeError(f"--model {name} needs methods.pixel_mamba ({err}); use --model mlp to try the script") from err
    return pixel_mamba(name.removeprefix("pixel_mamba_"), n_classes)


def _bench_rank(args: argparse.Namespace) -> dict | None:
    from methods.precision import bf16_autocast  # here, not at the top: importing methods imports this module

    w = init_from_env(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _bench_model(args.model)
    regions = max(1, args.pixels // (32 * 32)) if args.model != "mlp" else 4
    slides = [(torch.randint(0, 256, (regions, 32, 32, 3), dtype=torch.uint8, device=device),
               torch.tensor([i % 2], device=device)) for i in range(args.batch)]
    model = model.to(device)
    if args.model == "mlp":
        model(slides[0][0].float())  # materialise the lazy layer before DDP broadcasts the parameters
    model = wrap_model(model, w)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_fn(m: nn.Module, sample) -> torch.Tensor:
        pixels, label = sample
        with bf16_autocast(device):
            logits = m(pixels.float() if args.model == "mlp" else pixels)
        return nn.functional.cross_entropy(logits.float().reshape(1, -1), label)

    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_steps(model, slides, loss_fn, optimizer, args.batch, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    shutdown()
    if not w.is_main:
        return None
    step_s = sorted(times)[len(times) // 2]
    return {"model": args.model, "gpus": w.size, "effective_batch": args.batch, "tissue_pixels": regions * 1024,
            "step_s": step_s, "slides_per_s": args.batch / step_s, "peak_gib_rank0": peak}


def bench_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.distributed --bench",
                                description="Time one optimizer step (effective batch of synthetic slides) on N GPUs.")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--gpus", default="1", help="GPU counts to compare, e.g. 1,2,4 (one run each)")
    p.add_argument("--model", default="pixel_mamba_6m", help="pixel_mamba_6m | pixel_mamba_21m | mlp")
    p.add_argument("--pixels", type=int, default=4 * 2**20, help="tissue pixels per synthetic slide")
    p.add_argument("--batch", type=int, default=8, help="effective batch: slides per optimizer step over all GPUs")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda", help="cuda, or cpu (gloo) to try the script")
    p.add_argument("--json", help="append one JSON line per GPU count to this file")
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # a rank started by the torchrun below
        result = _bench_rank(args)
        if result is not None:
            unit = "GPU(s)" if args.device == "cuda" else "CPU rank(s)"
            print(f"{result['gpus']} {unit}: {result['step_s']:.3f} s per optimizer step of {args.batch} slides "
                  f"({result['slides_per_s']:.2f} slides/s, {result['tissue_pixels']} tissue pixels each)", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps(result) + "\n")
        return 0
    for count in [int(c) for c in args.gpus.split(",")]:
        if args.device == "cuda" and count > torch.cuda.device_count():
            raise SystemExit(f"--gpus {count}: only {torch.cuda.device_count()} CUDA GPUs are visible")
        if args.batch % count:
            print(f"note: effective batch {args.batch} is not a multiple of {count} GPUs: some micro-steps are padding",
                  file=sys.stderr)
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", f"--nproc-per-node={count}", "-m", "benchmark.distributed", *(argv or sys.argv[1:])])
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
