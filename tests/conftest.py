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
