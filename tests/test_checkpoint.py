"""The generator states that training state carries (benchmark.checkpoint.random_states) come back
exactly: after a round trip through a file loaded with weights_only=True (how pretraining checkpoints
are read), and from the runner's states saved before they were kept that way."""
import io
import random

import numpy as np
import torch

from benchmark import checkpoint


def draws() -> tuple:
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()


def test_random_states_round_trip_restores_python_numpy_and_torch_streams():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves numpy's cached gauss set: it is part of the state
    buffer = io.BytesIO()
    torch.save(checkpoint.random_states(), buffer)
    expected = draws()
    buffer.seek(0)
    checkpoint.set_random_states(torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_the_runners_states_saved_before_random_states_still_restore():
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = draws()
    checkpoint.set_random_states(legacy)
    assert draws() == expected
