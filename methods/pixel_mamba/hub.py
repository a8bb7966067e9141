"""Pixel-Mamba pretrained weights on the Hugging Face Hub, or in a local folder of the same layout.

A model folder holds `model.safetensors` (the classifier's state dict: the body `layers.*` that
`pixel_mamba` fine-tuning takes, and the ImageNet head `head.*`), `config.json` (model, classes,
recipe, metrics) and `README.md` (the model card).

    folder = write_model_folder(out / "model", state_dict, config)
    push_to_hub(folder, "OWNER/NAME")           # upload; or a local path: copy there (offline)
    path = resolve_weights("hf:OWNER/NAME")      # -> local model.safetensors (the hub cache offline)

`hf:REPO` also accepts a local model folder (`hf:./pm6m`), so a pushed folder can be used without any
network; with HF_HUB_OFFLINE=1 a hub name is read from the local hub cache only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


def write_model_folder(folder: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write the weights, config and model card to `folder` (replaced atomically); returns it.

    config: plain data with at least `model` and `num_classes`; `recipe` (dict), `metrics` (dict) and
    `repo` (the hub name it will be pushed to) go into the card when present."""
    from safetensors.torch import save_file

    from datasets.cache import atomic_path

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "model": str(config["model"])})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / CARD_NAME).write_text(model_card(config))
        if folder.exists():  # atomic_path replaces files, not non-empty folders
            shutil.rmtree(folder)
    return folder


def model_card(config: dict[str, Any]) -> str:
    """The model card (YAML metadata + Markdown) of a pretrained Pixel-Mamba."""
    from huggingface_hub import ModelCard, ModelCardData

    model, metrics, recipe = config["model"], config.get("metrics") or {}, config.get("recipe") or {}
    repo = config.get("repo") or "OWNER/NAME"
    side = int(config.get("img_size", 224))
    data = ModelCardData(library_name="wsi-bench", license="apache-2.0", tags=["pathology", "mamba", "image-classification", "pixel-mamba"],
                         datasets=[recipe["dataset"]] if recipe.get("dataset") else None, metrics=["accuracy"],
                         pipeline_tag="image-classification")
    metric_rows = "\n".join(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
                            for name, value in metrics.items()) or "| (none yet) | |"
    recipe_rows = "\n".join(f"| {name} | {value} |" for name, value in sorted(recipe.items()))
    content = f"""---
{data.to_yaml()}
---

# {model}: Pixel-Mamba pretrained as an image classifier

Pixel-Mamba (arXiv 2412.16711) as the paper pretrains it before whole-slide fine-tuning: pixel tokens of
{side} x {side} images ({side // 32} x {side // 32} regions of 32 x 32 pixels) through 24 bidirectional Mamba layers with token
expansion and region fusion, then norm, mean pooling and a linear classifier over
{config["num_classes"]} classes. Trained with wsi-bench: `python -m benchmark.pretrain`.

## Use

Fine-tune on whole slides (the body `layers.*` and the final norm `head.norm` are loaded; the
attention pooling and the classifier are new):

    python run_benchmark.py --method {"pixel_mamba_21m" if model.endswith("21m") else "pixel_mamba"} --weights hf:{repo} ...

or load the classifier:

    from methods.pixel_mamba.classifier import pixel_mamba_classifier
    model = pixel_mamba_classifier("{model}", num_classes={config["num_classes"]})
    model.load_state_dict(safetensors.torch.load_file("{WEIGHTS_NAME}"))

Inputs are RGB images normalised with the ImageNet mean and std, sides a multiple of 32.

## Metrics (validation set, last epoch)

| metric | value |
|---|---|
{metric_rows}

## Training recipe

| setting | value |
|---|---|
{recipe_rows}
"""
    return ModelCard(content).content


def is_local_repo(repo: str) -> bool:
    """A REPO that names a local folder rather than OWNER/NAME on the hub."""
    return repo.startswith(("/", "./", "../", "~", "file://")) or Path(repo).expanduser().is_dir()


def push_to_hub(folder: Path, repo: str, *, private: bool = False, message: str = "Pixel-Mamba pretrained weights") -> str:
    """Upload a model folder to the hub repo OWNER/NAME (created if missing), or copy it to a local
    folder when `repo` is a path. Returns where it went (URL or path)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}: finish or resume the pretraining run first")
    if is_local_repo(repo):
        target = Path(repo.removeprefix("file://")).expanduser()
        shutil.copytree(folder, target, dirs_exist_ok=True)
        return str(target)
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise RuntimeError(f"HF_HUB_OFFLINE is set: cannot upload to {repo}; unset it, or push to a local folder (--push-to-hub ./DIR)")
    if repo.count("/") != 1:
        raise ValueError(f"--push-to-hub {repo}: write OWNER/NAME (a hub model repo) or a local path (./DIR)")
    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", commit_message=message)
    return f"https://huggingface.co/{repo}"


def resolve_weights(spec: str) -> Path:
    """A local file for `hf:REPO[/FILE]` (REPO = OWNER/NAME or a local model folder) or a plain path.

    Hub names go through `hf_hub_download`, which honours HF_HUB_OFFLINE (cache only) and HF_TOKEN."""
    if not spec.startswith("hf:"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; pass an existing checkpoint or hf:OWNER/NAME")
        return path
    repo = spec[3:]
    if is_local_repo(repo):
        path = Path(repo.removeprefix("file://")).expanduser()
        path = path / WEIGHTS_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--weights {spec}: {path} does not exist; push a model folder there first")
        return path
    parts = repo.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"--weights {spec}: write hf:OWNER/NAME, hf:OWNER/NAME/FILE or hf:./LOCAL_FOLDER")
    from huggingface_hub import hf_hub_download

    # a named FILE, else our model.safetensors, else the torch file that other uploads carry
    filenames = ["/".join(parts[2:])] if len(parts) > 2 else [WEIGHTS_NAME, TORCH_WEIGHTS_NAME]
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download("/".join(parts[:2]), filename))
        except Exception as err:  # noqa: BLE001 - offline, gated, missing: one message that says what to do
            errors.append(f"{filename}: {type(err).__name__}")
    raise RuntimeError(f"could not get {' or '.join(filenames)} of Hugging Face repo {'/'.join(parts[:2])} "
                       f"({'; '.join(errors)}); check the name and HF_TOKEN, download it once online, or use a local path")
