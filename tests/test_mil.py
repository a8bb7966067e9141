"""MIL aggregators and the bag trainer, checked against hand-written computations."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmark.registry import AGGREGATORS
from methods.mil import Bag, Recipe, predict_bags, train_bags
from methods.mil.abmil import ABMIL
from methods.mil.pooling import PoolMIL
from methods.mil.train import split_inner


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_params(module):
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("size,hidden", [("small", 256), ("big", 384)])
def test_abmil_equals_gated_attention_formula(size, hidden):
    torch.manual_seed(0)
    model = ABMIL(in_dim=20, n_classes=3, size=size).eval()
    bag = torch.randn(7, 20)
    p = numpy_params(model)
    x = bag.double().numpy()
    h = np.maximum(x @ p["attention_net.0.weight"].T + p["attention_net.0.bias"], 0)
    a = np.tanh(h @ p["attention_net.3.attention_a.0.weight"].T + p["attention_net.3.attention_a.0.bias"])
    b = sigmoid(h @ p["attention_net.3.attention_b.0.weight"].T + p["attention_net.3.attention_b.0.bias"])
    scores = (a * b) @ p["attention_net.3.attention_c.weight"].T + p["attention_net.3.attention_c.bias"]
    attention = np.exp(scores[:, 0] - scores.max()) / np.exp(scores[:, 0] - scores.max()).sum()
    pooled = (attention[:, None] * h).sum(axis=0)
    expected = pooled @ p["classifiers.weight"].T + p["classifiers.bias"]

    logits, weights = model(bag, return_attention=True)
    assert p["attention_net.0.weight"].shape == (512, 20)
    assert p["attention_net.3.attention_a.0.weight"].shape == (hidden, 512)
    np.testing.assert_allclose(weights[0].detach().numpy(), attention, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logits[0].detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_abmil_dropout_is_025_in_the_three_places_clam_has_it():
    model = ABMIL(1024, 2)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pooling_equals_formula(mode):
    torch.manual_seed(1)
    model = PoolMIL(10, 2, mode).eval()
    bag = torch.randn(5, 10)
    p = numpy_params(model)
    h = np.maximum(bag.double().numpy() @ p["fc.0.weight"].T + p["fc.0.bias"], 0)
    pooled = h.mean(axis=0) if mode == "mean" else h.max(axis=0)
    expected = pooled @ p["classifier.weight"].T + p["classifier.bias"]
    np.testing.assert_allclose(model(bag)[0].detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_aggregators_registered():
    for name in ("abmil", "abmil_big", "mambamil", "meanpool", "maxpool"):
        assert name in AGGREGATORS


def toy_bags(n, seed, dim=8):
    """Positive bags hold a few instances shifted along one feature direction."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        label = i % 2
        x = rng.normal(size=(int(rng.integers(5, 15)), dim)).astype(np.float32)
        if label:
            x[:3, 0] += 3.0
        bags.append(Bag(f"p{i}", torch.from_numpy(x), {"label": torch.tensor(label)}))
    return bags


def test_abmil_learns_toy_task_and_repeats_exactly_by_seed():
    def run(seed):
        torch.manual_seed(seed)
        model = AGGREGATORS.create("abmil", in_dim=8, n_classes=2)
        train_bags(model, toy_bags(16, 0), "classification", Recipe(epochs=3, lr=1e-3), seed=seed)
        return predict_bags(model, toy_bags(20, 1), "classification")

    first, again, other = run(3), run(3), run(4)
    labels = [int(b.target["label"]) for b in toy_bags(20, 1)]
    assert roc_auc_score(labels, first[:, 1]) > 0.9, roc_auc_score(labels, first[:, 1])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_allclose(first.sum(axis=1), 1, rtol=1e-6)


def test_gradient_accumulation_equals_one_step_on_the_mean_loss():
    bags = toy_bags(4, 2)
    torch.manual_seed(0)
    accumulated = PoolMIL(8, 2, "mean", dropout=0.0)
    reference = PoolMIL(8, 2, "mean", dropout=0.0)
    reference.load_state_dict(accumulated.state_dict())
    train_bags(accumulated, bags, "classification", Recipe(epochs=1, lr=1e-2, grad_accum=4), seed=0)

    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=1e-5)
    loss = torch.stack([
        torch.nn.functional.cross_entropy(reference(b.features), b.target["label"].view(1)) for b in bags
    ]).mean()
    loss.backward()
    optimizer.step()
    for (name, a), b in zip(accumulated.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_survival_training_gives_one_risk_per_bag():
    rng = np.random.default_rng(0)
    bags = [Bag(f"p{i}", torch.randn(6, 8), {"bin": torch.tensor(i % 4), "censored": torch.tensor(float(rng.random() < 0.4))})
            for i in range(12)]
    torch.manual_seed(0)
    model = AGGREGATORS.create("abmil", in_dim=8, n_classes=4)
    info = train_bags(model, bags, "survival", Recipe(epochs=2, grad_accum=32), seed=0)
    risk = predict_bags(model, bags, "survival")
    assert risk.shape == (12,) and info["epochs_run"] == 2
    assert np.all(risk <= 0) and np.all(risk >= -4)  # -sum of 4 survival probabilities


def test_early_stopping_splits_training_bags_only_and_restores_best():
    bags = toy_bags(20, 5)
    train, inner = split_inner(bags, "classification", Recipe(epochs=1, early_stopping=True), seed=0)
    ids = lambda bs: {b.patient_id for b in bs}  # noqa: E731
    assert ids(train) | ids(inner) == ids(bags) and not ids(train) & ids(inner)
    assert len(inner) == 4
    assert split_inner(bags, "classification", Recipe(epochs=1), seed=0) == (bags, [])
    torch.manual_seed(0)
    model = AGGREGATORS.create("abmil", in_dim=8, n_classes=2)
    info = train_bags(model, bags, "classification", Recipe(epochs=6, lr=1e-3, early_stopping=True, patience=2), seed=0)
    assert info["inner_val_bags"] == 4 and 1 <= info["best_epoch"] <= info["epochs_run"]


def test_recipe_cap():
    assert Recipe(epochs=50).capped(3).epochs == 3
    assert Recipe(epochs=2).capped(3).epochs == 2
    assert Recipe(epochs=2).capped(None).epochs == 2


def test_no_training_bags_is_a_clear_error():
    with pytest.raises(ValueError, match="no training bags"):
        train_bags(PoolMIL(8, 2, "mean"), [], "classification", Recipe(epochs=1), seed=0)


def test_mambamil_is_the_published_architecture():
    from methods.ssm.mixer import SRMambaMixer

    torch.manual_seed(0)
    model = AGGREGATORS.create("mambamil", in_dim=20, n_classes=3).eval()
    assert model._fc1[0].weight.shape == (512, 20) and isinstance(model._fc1[1], torch.nn.GELU)
    assert model._fc1[2].p == 0.25
    assert len(model.layers) == 2
    for norm, mixer in model.layers:
        assert isinstance(norm, torch.nn.LayerNorm) and isinstance(mixer, SRMambaMixer)
        assert mixer.rate == 5 and mixer.A_log.shape == (1024, 16) and mixer.A_b_log.shape == (1024, 16)
        assert mixer.conv1d.kernel_size == (4,)
    assert [m.weight.shape for m in model.attention if hasattr(m, "weight")] == [(128, 512), (1, 128)]
    assert model.classifier.weight.shape == (3, 512)

    bag = torch.randn(11, 20)  # odd length: the stride-5 interleave pads
    with torch.no_grad():
        h = model._fc1(bag)[None]
        for norm, mixer in model.layers:
            h = h + mixer(norm(h))
        h = model.norm(h)[0]
        scores = model.attention(h)[:, 0]
        expected = model.classifier(torch.softmax(scores, 0) @ h)
        logits, weights = model(bag, return_attention=True)
    torch.testing.assert_close(logits[0], expected)
    torch.testing.assert_close(weights[0], torch.softmax(scores, 0))


def test_mambamil_trains_on_cpu_and_repeats_by_seed():
    def run(seed):
        from methods.mil.mambamil import MambaMIL

        torch.manual_seed(seed)
        model = MambaMIL(in_dim=8, n_classes=2, d_model=32)  # narrow: the trainer path, not the spec, is tested
        before = model.classifier.weight.clone()
        train_bags(model, toy_bags(3, 0), "classification", Recipe(epochs=1), seed=seed)
        assert not torch.equal(before, model.classifier.weight)
        return predict_bags(model, toy_bags(2, 1), "classification")

    np.testing.assert_array_equal(run(0), run(0))


def test_cpu_training_uses_one_thread_and_restores_the_setting(monkeypatch):
    seen = []
    model = PoolMIL(8, 2, "mean")
    original_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda bag: seen.append(torch.get_num_threads()) or original_forward(bag))
    before = torch.get_num_threads()
    train_bags(model, toy_bags(2, 0), "classification", Recipe(epochs=1), seed=0)
    predict_bags(model, toy_bags(1, 0), "classification")
    assert set(seen) == {1} and torch.get_num_threads() == before
