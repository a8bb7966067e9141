"""Patch encoders, registered in benchmark.registry.ENCODERS.

    encoder = create_encoder("resnet50_trunc", weights="hub")       # or a path, or "random"
    encoder = create_encoder("timm:hf-hub:MahmoodLab/UNI")           # any timm model by name
"""
from __future__ import annotations

from benchmark.registry import ENCODERS
from methods.encoders import conch, resnet50_trunc, timm_hub  # noqa: F401  (registration)
from methods.encoders.base import PatchEncoder, Preprocess
from methods.encoders.weights import WeightsUnavailableError, parse_weights

__all__ = ["PatchEncoder", "Preprocess", "WeightsUnavailableError", "create_encoder", "weights_provenance"]


def create_encoder(name: str, weights: str | None = "hub", input_size: int | None = None) -> PatchEncoder:
    """A registered encoder, or `timm:<model>`. weights: 'hub' | <path> | 'random'."""
    if name.startswith(timm_hub.PREFIX):
        return timm_hub.timm_encoder(name, weights=weights, input_size=input_size)
    return ENCODERS.create(name, weights=weights, input_size=input_size)


def weights_provenance(name: str, weights: str | None = "hub") -> str:
    """FoldOutput.weights for an encoder without building it: 'pretrained:hub:<repo>',
    'pretrained:file:<path>' or 'random'."""
    if name.startswith(timm_hub.PREFIX):
        repo = timm_hub.hub_repo(name[len(timm_hub.PREFIX) :])
    else:
        repo = ENCODERS.get(name).meta["hub_repo"]
    return parse_weights(weights).provenance(repo)
