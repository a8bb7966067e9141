import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def toy_registries(monkeypatch):
    """Register the toy cohort and method for one test."""
    from benchmark.registry import DATASETS, METHODS, Entry, load_all
    from tests.toy import ToyMethod, toy_cohort

    load_all()
    monkeypatch.setitem(DATASETS._entries, "toy", Entry("toy", "toy cohort", toy_cohort))
    monkeypatch.setitem(METHODS._entries, "toy", Entry("toy", "toy method", ToyMethod))
    monkeypatch.setitem(METHODS._entries, "toy2", Entry("toy2", "toy method, more noise",
                                                        lambda **kw: ToyMethod(**{"noise": 3.0, **kw})))


@pytest.fixture
def triton_interpreter():
    """Run a test file as a script in Triton's interpreter on the CPU (TRITON_INTERPRET is read when the
    kernels are defined, hence a fresh process); fails the test with the script's output if it fails."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]

    def run(script: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo), CUDA_VISIBLE_DEVICES="")
        done = subprocess.run([sys.executable, script], env=env, cwd=repo, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    return run


@pytest.fixture
def toy_a_refusing_checkpointing(monkeypatch):
    """toy_a as a method that cannot take the out-of-memory retry's `activation_checkpointing` setting."""
    import tests.toy_plugin  # noqa: F401  (registers toy_a)
    from benchmark.registry import METHODS, Entry

    factory = METHODS.get("toy_a").obj

    def refusing(**overrides):
        if "activation_checkpointing" in overrides:
            raise TypeError("unexpected setting activation_checkpointing")
        return factory(**overrides)

    monkeypatch.setitem(METHODS._entries, "toy_a", Entry("toy_a", "", refusing))
