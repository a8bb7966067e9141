"""Pixel-Mamba checkpoints: `--weights none | PATH | hf:OWNER/REPO[/FILE] | hf:./LOCAL_FOLDER`
(resolved by methods.pixel_mamba.hub.resolve_weights).

The paper published no weights, so there is no default hub checkpoint: without one the model trains
from scratch and results say `weights = none`. A checkpoint is a state dict of our `PixelMamba` module
(optionally under a "model" / "state_dict" key, with DDP's `module.` prefix); the body must match the
model size exactly, head keys of another shape (e.g. an ImageNet classifier) are left new.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.encoders import weights as encoder_weights
from methods.pixel_mamba.hub import resolve_weights

log = logging.getLogger(__name__)

SIZE_BY_LAST_WIDTH = {384: "pixel_mamba (6M)", 768: "pixel_mamba_21m (21M)"}
LAST_WIDTH_KEY = "layers.23.norm.weight"


def load_weights(model: nn.Module, spec: str | None) -> tuple[str, dict[str, Any]]:
    """Load `spec` into `model`; returns the FoldOutput weights label and a report for FoldOutput.info."""
    if spec is None or spec.lower() in ("", "none", "random"):
        return "none", {"weights": "none (trained from scratch)"}
    if spec == "hub":
        raise ValueError("pixel_mamba has no published checkpoint: pass --weights PATH or hf:OWNER/REPO[/FILE], or none")
    path = resolve_weights(spec)
    report = apply_state_dict(model, read_state_dict(path))
    log.info("weights %s: %d tensors taken, %d new, %d unused", spec, report["weights_taken"],
             len(report["weights_new"]), len(report["weights_unused"]))
    return f"pretrained:{spec}", {"weights": spec, **report}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch checkpoint (the encoders' reader: unwrapped, without DDP's
    `module.` prefix); other entries of the dict are dropped."""
    return {k: v for k, v in encoder_weights.read_state_dict(path).items() if isinstance(v, torch.Tensor)}


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Copy the matching tensors; refuse a checkpoint of the other size or without body tensors."""
    own = model.state_dict()
    if LAST_WIDTH_KEY in state and LAST_WIDTH_KEY in own and state[LAST_WIDTH_KEY].shape != own[LAST_WIDTH_KEY].shape:
        other = SIZE_BY_LAST_WIDTH.get(state[LAST_WIDTH_KEY].shape[0], "another model")
        raise ValueError(f"the checkpoint is for {other}, not this model; use the method of its size")
    taken = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    clashes = [k for k in state if k in own and k not in taken and not k.startswith("head.")]
    if clashes:
        raise ValueError(f"checkpoint tensors of the wrong shape for this model: {', '.join(clashes[:3])}")
    if not any(k.startswith("layers.") for k in taken):
        raise ValueError("the checkpoint has no Pixel-Mamba body tensors (layers.*): is it a Pixel-Mamba checkpoint?")
    model.load_state_dict(taken, strict=False)
    return {
        "weights_taken": len(taken),
        "weights_new": sorted(set(own) - set(taken)),
        "weights_unused": sorted(set(state) - set(taken)),
    }
