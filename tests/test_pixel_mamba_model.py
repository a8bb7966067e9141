"""The Pixel-Mamba model: parameter counts against the design's figures, forward and backward on tiny
inputs (one region included), activation checkpointing, and that training lowers the loss."""
import numpy as np
import pytest
import torch

from methods.pixel_mamba.method import PixelMambaConfig, Sample, effective_batch, predict_logits, train_model
from methods.pixel_mamba.model import pixel_mamba, pixel_mamba_6m, pixel_mamba_21m


def tiny_pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_body_parameter_counts_match_the_paper_sizes():
    # shared PIXEL_MAMBA.md section 3: the bidirectional block over the two tables
    assert pixel_mamba_6m(2).body_parameters() == pytest.approx(6.26e6, rel=0.05)
    assert pixel_mamba_21m(2).body_parameters() == pytest.approx(20.6e6, rel=0.05)


@pytest.mark.parametrize("n_regions", [1, 2, 7])
def test_forward_and_backward_on_a_tiny_image(n_regions):
    torch.manual_seed(0)
    model = pixel_mamba_6m(3)
    tokens, sizes = model.features(tiny_pixels(n_regions))
    assert tokens.shape[1] == 384 and sizes.sum().item() == n_regions
    logits = model(tiny_pixels(n_regions))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    first, last = model.layers[0].mixer.in_proj.weight.grad, model.layers[-1].mixer.out_proj.weight.grad
    assert first.abs().sum() > 0 and last.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_region_fusion_leaves_a_fifth_of_the_regions():
    model = pixel_mamba_6m(2)
    with torch.no_grad():
        _, sizes = model.features(tiny_pixels(30))
    assert len(sizes) == 30 - 24 == 6  # k = ceil(0.8 * 30 / 24) = 1 per layer, 24 of 30 fused
    assert sizes.sum().item() == 30


def test_activation_checkpointing_gives_the_same_numbers():
    torch.manual_seed(0)
    plain = pixel_mamba_6m(2)
    checkpointed = pixel_mamba_6m(2, checkpoint_layers=True)
    checkpointed.load_state_dict(plain.state_dict())
    pixels = tiny_pixels(3)
    for model in (plain, checkpointed):
        model(pixels).sum().backward()
    assert torch.allclose(plain(pixels), checkpointed(pixels))
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_bad_inputs_are_refused():
    model = pixel_mamba_6m(2)
    with pytest.raises(ValueError, match="without tissue"):
        model(torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="size"):
        pixel_mamba("7m", 2)


def test_effective_batch_is_fixed_unless_the_accumulation_is():
    assert effective_batch(PixelMambaConfig(), 1) == effective_batch(PixelMambaConfig(), 8) == 64
    assert effective_batch(PixelMambaConfig(accumulation=2), 8) == 16


def colour_samples(n: int, seed: int) -> list[Sample]:
    """Bags of 2 noisy regions: class 0 reddish, class 1 bluish."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = i % 2
        colour = np.array([200, 60, 90]) if label == 0 else np.array([90, 60, 200])
        pixels = np.clip(colour + rng.normal(0, 25, (2, 32, 32, 3)), 0, 255).astype(np.uint8)
        samples.append(Sample(f"p{i}", [torch.from_numpy(pixels)], {"label": torch.tensor([label])}))
    return samples


def bag_inputs(sample, rng):
    return [lambda pixels=pixels: pixels for pixels in sample.sources]


def test_training_on_two_colour_classes_lowers_the_loss_deterministically():
    samples = colour_samples(8, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = pixel_mamba_6m(2)
        history = train_model(model, samples, "classification", bag_inputs, epochs=4, lr=1e-3,
                              weight_decay=0.05, effective_batch=2, seed=0, device=torch.device("cpu"))
        runs.append(history)
    assert runs[0] == runs[1]  # deterministic by seed on the CPU
    assert runs[0][-1] < 0.5 * runs[0][0]
    held_out = [s.sources[0] for s in colour_samples(4, seed=1)]
    predicted = torch.stack(predict_logits(model, held_out, torch.device("cpu"))).argmax(1)
    assert predicted.tolist() == [0, 1, 0, 1]


# ---- the trainer under the runner's fault and multi-GPU rules ----------------------------------------
def train_tiny(job_dir=None, world=None, epochs: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    """7 bags in optimizer steps of 4 (the last step has 3: uneven over 2 ranks)."""
    torch.manual_seed(0)
    model = pixel_mamba_6m(2)
    history = train_model(model, colour_samples(7, seed=0), "classification", bag_inputs, epochs=epochs, lr=1e-3,
                          weight_decay=0.05, effective_batch=4, seed=0, device=torch.device("cpu"),
                          job_dir=job_dir, world=world)
    return history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_killed_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from benchmark import checkpoint

    history, weights = train_tiny()
    save = checkpoint.save

    def save_then_die(job_dir, epoch, **kwargs):
        save(job_dir, epoch, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt  # killed after the second epoch's state was written

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path)
    monkeypatch.setattr(checkpoint, "save", save)
    resumed_history, resumed = train_tiny(tmp_path)
    assert resumed_history == history
    for name, value in weights.items():
        assert torch.equal(resumed[name], value), name


def _tiny_rank(rank: int, port: int, out: str) -> None:
    import os

    from benchmark import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = distributed.init_from_env("cpu")
    history, weights = train_tiny(world=world, epochs=2)
    torch.save({"history": history, "weights": weights}, f"{out}.rank{rank}")
    distributed.shutdown()


def test_two_gloo_ranks_train_the_weights_of_one_process(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    history, weights = train_tiny(epochs=2)
    mp.spawn(_tiny_rank, args=(free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"run.rank{rank}")
        assert saved["history"] == pytest.approx(history, rel=1e-5)
        for name, value in weights.items():
            assert torch.allclose(saved["weights"][name], value, atol=1e-5, rtol=0), name
