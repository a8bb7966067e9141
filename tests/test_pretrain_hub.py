"""Pretrained weights through the Hugging Face Hub layout without any network: a model folder with its
card, a push to a local folder or (mocked) to the hub, and `hf:` names resolved from a local folder or,
with HF_HUB_OFFLINE, from the hub cache."""
import shutil

import pytest
import torch

from methods.pixel_mamba.classifier import pixel_mamba_classifier
from methods.pixel_mamba.hub import WEIGHTS_NAME, push_to_hub, resolve_weights, write_model_folder

CONFIG = {"model": "pixel_mamba_6m", "num_classes": 3, "classes": ["blue", "green", "red"], "img_size": 224,
          "recipe": {"lr": 0.001, "weight_decay": 0.05, "mixup": 0.8, "epochs": 300, "dataset": "imagenet-1k"},
          "metrics": {"epoch": 300, "val_top1": 71.25, "val_top5": 90.5}}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return pixel_mamba_classifier("pixel_mamba_6m", num_classes=3)


@pytest.fixture
def folder(tmp_path, classifier):
    return write_model_folder(tmp_path / "model", classifier.state_dict(), CONFIG)


def test_model_folder_has_the_weights_and_a_card_with_recipe_and_metrics(folder, classifier):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    weights = load_file(str(folder / WEIGHTS_NAME))
    assert weights.keys() == classifier.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in classifier.state_dict().items())
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "wsi-bench" and card.data.datasets == ["imagenet-1k"]
    for row in ("| lr | 0.001 |", "| weight_decay | 0.05 |", "| mixup | 0.8 |", "| val_top1 | 71.2500 |", "| epoch | 300 |"):
        assert row in card.text, row
    assert "--method pixel_mamba --weights hf:OWNER/NAME" in card.text
    rewritten = write_model_folder(folder, classifier.state_dict(), {**CONFIG, "metrics": {"val_top1": 72.0}, "repo": "lab/pm6m"})
    text = (rewritten / "README.md").read_text()
    assert "| val_top1 | 72.0000 |" in text and "--weights hf:lab/pm6m" in text and "71.25" not in text


def test_push_to_a_local_folder_and_load_it_by_hf_path_into_the_wsi_model(folder, classifier, tmp_path):
    from methods.pixel_mamba.model import pixel_mamba_6m
    from methods.pixel_mamba.weights import load_weights

    target = tmp_path / "repo"
    assert push_to_hub(folder, str(target)) == str(target)
    path = resolve_weights(f"hf:{target}")
    assert path == target / WEIGHTS_NAME
    wsi = pixel_mamba_6m(2)
    label, info = load_weights(wsi, str(path))
    assert label.startswith("pretrained:")
    assert torch.equal(wsi.layers[7].mixer.out_proj.weight, classifier.layers[7].mixer.out_proj.weight)
    assert all(k.startswith("head.") for k in info["weights_new"]) and "head.classifier.weight" in info["weights_new"]
    by_name = pixel_mamba_6m(2)  # the fine-tuning spelling: --weights hf:<local model folder>
    assert load_weights(by_name, f"hf:{target}")[0] == f"pretrained:hf:{target}"
    assert torch.equal(by_name.layers[7].mixer.out_proj.weight, classifier.layers[7].mixer.out_proj.weight)
    with pytest.raises(FileNotFoundError, match="push a model folder there first"):
        resolve_weights(f"hf:{tmp_path / 'nothing'}/")


def test_hub_names_resolve_from_the_cache_offline(folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # what an earlier download leaves in the cache (the documented cache layout)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--lab--pixel-mamba-6m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    path = resolve_weights("hf:lab/pixel-mamba-6m")
    assert path.read_bytes() == (folder / WEIGHTS_NAME).read_bytes()
    assert resolve_weights("hf:lab/pixel-mamba-6m/config.json").name == "config.json"
    with pytest.raises(RuntimeError, match="download it once online"):
        resolve_weights("hf:lab/not-downloaded")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(folder, "lab/pixel-mamba-6m")


def test_push_to_a_hub_name_creates_the_repo_and_uploads_the_folder(folder, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)))
    assert push_to_hub(folder, "lab/pm6m") == "https://huggingface.co/lab/pm6m"
    assert [c[:2] for c in calls] == [("create", "lab/pm6m"), ("upload", "lab/pm6m")]
    assert calls[0][2]["exist_ok"] and calls[1][2]["folder_path"] == str(folder)


def test_bad_pushes_and_names_are_refused(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        push_to_hub(tmp_path, "lab/pm6m")
    with pytest.raises(ValueError, match="OWNER/NAME"):
        push_to_hub(folder, "lab/pm6m/extra")
    with pytest.raises(ValueError, match="hf:OWNER/NAME"):
        resolve_weights("hf:justaname")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(str(tmp_path / "missing.pt"))
