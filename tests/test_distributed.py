"""Multi-process training (gloo on the CPU) gives the weights of one process with the same effective
batch; per-epoch training state resumes to the weights of an uninterrupted run."""
import argparse
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from benchmark import checkpoint, distributed
from benchmark.distributed import World, step_schedule, train_steps

EFFECTIVE_BATCH = 4
N_BAGS = 7  # 7 bags in steps of 4: the last step has 3, uneven over 2 ranks
EPOCHS = 3


class BagMLP(nn.Module):
    """Instances -> hidden -> mean over the bag -> logits: a MIL model over variable-length bags."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(dropout))
        self.classify = nn.Linear(8, 2)

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(bag).mean(0))


def bags(n: int = N_BAGS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3 + 2 * i, 5, generator=g), torch.tensor(i % 2)) for i in range(n)]


def bag_loss(model: nn.Module, sample) -> torch.Tensor:
    bag, label = sample
    device = next(model.parameters()).device
    return nn.functional.cross_entropy(model(bag.to(device))[None], label[None].to(device))


def train(world: World, device: str = "cpu") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = distributed.wrap_model(BagMLP().to(device), world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    rng = np.random.default_rng(0)
    data = bags()
    for _ in range(EPOCHS):
        order = [data[i] for i in rng.permutation(len(data))]
        train_steps(model, order, bag_loss, optimizer, EFFECTIVE_BATCH, world)
    return {k: v.detach().cpu().clone() for k, v in distributed.unwrap(model).state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, port: int, out: str, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    world = distributed.init_from_env(device)
    reductions = []
    original = distributed.wrap_model

    def counting_wrap(model, w):  # count gradient all-reduces (one bucket per sync for this tiny model)
        ddp = original(model, w)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp.register_comm_hook(None, lambda state, bucket: reductions.append(1) or allreduce_hook(None, bucket))
        return ddp

    distributed.wrap_model = counting_wrap
    weights = train(world, f"cuda:{rank}" if device == "cuda" else "cpu")
    torch.save({"weights": weights, "reductions": len(reductions)}, f"{out}.rank{rank}")
    distributed.shutdown()


def check_two_ranks(tmp_path, device: str) -> None:
    single = train(World(), device)
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "weights"), device), nprocs=2, join=True)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"weights.rank{rank}")
        for name, value in single.items():
            assert torch.allclose(saved["weights"][name], value, atol=1e-5, rtol=0), name
        # gradients were all-reduced once per optimizer step, not once per micro-step
        assert saved["reductions"] == EPOCHS * -(-N_BAGS // EFFECTIVE_BATCH)
    assert any(not torch.equal(single[k], BagMLP().state_dict()[k]) for k in single)  # training moved weights


def test_two_gloo_ranks_train_the_weights_of_one_process(tmp_path):
    check_two_ranks(tmp_path, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_nccl_ranks_train_the_weights_of_one_gpu(tmp_path):
    check_two_ranks(tmp_path, "cuda")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch", [(7, 4), (8, 4), (5, 6), (1, 3), (10, 3)])
def test_step_schedule_covers_each_sample_once_with_weights_of_one_process(world_size, n, batch):
    per_rank = [step_schedule(n, batch, World(rank, world_size, rank)) for rank in range(world_size)]
    n_steps = -(-n // batch)
    assert all(len(steps) == n_steps for steps in per_rank)
    for step in range(n_steps):
        expected = list(range(step * batch, min(n, (step + 1) * batch)))
        micro = [per_rank[r][step] for r in range(world_size)]
        assert len({len(m) for m in micro}) == 1  # every rank joins every all-reduce
        real = sorted(i for m in micro for i, w in m if w)
        assert real == expected
        # DDP averages over ranks: the summed weight of a sample over ranks / world = 1 / step size
        for m in micro:
            assert all(w in (0.0, pytest.approx(world_size / len(expected))) for _, w in m)


def test_train_steps_refuses_an_unwrapped_model_on_several_ranks():
    with pytest.raises(ValueError, match="wrap_model"):
        train_steps(BagMLP(), bags(), bag_loss, torch.optim.SGD(BagMLP().parameters(), lr=0.1), 2, World(0, 2, 0))


def test_train_steps_loss_is_mean_over_samples():
    model = BagMLP()
    data = bags()
    with torch.no_grad():
        expected = np.mean([bag_loss(model, s).item() for s in data])
    lazy = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, the losses are comparable
    assert train_steps(model, data, bag_loss, lazy, 3) == pytest.approx(expected, rel=1e-6)


# ---- per-epoch training state -----------------------------------------------------------------------
def train_with_state(job_dir, epochs: int, stop_after: int | None = None) -> dict[str, torch.Tensor]:
    """Dropout, a numpy shuffle and a schedule: all random states must come back on resume."""
    torch.manual_seed(0)
    model = BagMLP(dropout=0.3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * 2)
    rng = np.random.default_rng(0)
    data = bags()
    start, extra = checkpoint.resume(job_dir, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng)
    history = extra.get("history", [])
    for epoch in range(start, epochs):
        if epoch == stop_after:
            raise KeyboardInterrupt  # the job is killed here
        order = [data[i] for i in rng.permutation(len(data))]
        history.append(train_steps(model, order, bag_loss, optimizer, EFFECTIVE_BATCH, on_step=scheduler.step))
        checkpoint.save(job_dir, epoch + 1, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng,
                        extra={"history": history})
    return {**model.state_dict(), "history": torch.tensor(history)}


def test_resume_from_epoch_state_gives_the_uninterrupted_weights(tmp_path):
    uninterrupted = train_with_state(None, epochs=4)
    with pytest.raises(KeyboardInterrupt):
        train_with_state(tmp_path / "job", epochs=4, stop_after=2)
    assert checkpoint.resume(tmp_path / "job", model=BagMLP())[0] == 2
    resumed = train_with_state(tmp_path / "job", epochs=4)
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
    assert not list((tmp_path / "job").rglob("*.tmp"))


def test_job_dir_of_another_config_is_not_resumed(tmp_path):
    job = tmp_path / "job"
    checkpoint.claim_job_dir(job, "aaaa")
    checkpoint.save(job, 3, model=BagMLP())
    checkpoint.claim_job_dir(job, "aaaa")
    assert checkpoint.resume(job, model=BagMLP())[0] == 3
    checkpoint.claim_job_dir(job, "bbbb")  # same method, fold and seed; other settings
    assert checkpoint.resume(job, model=BagMLP()) == (0, {})


def test_bench_step_runs_on_the_cpu():
    args = argparse.Namespace(device="cpu", model="mlp", pixels=0, batch=2, steps=1, warmup=0)
    result = distributed._bench_rank(args)
    assert result["gpus"] == 1 and result["effective_batch"] == 2 and result["step_s"] > 0
