"""ResNet-50 (ImageNet, torchvision weights) cut after layer3 + global average pool: the 1024-d "R50"
patch features of CLAM and nearly every MIL paper (shared BASELINES.md section 2)."""
from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import ENCODERS
from methods.encoders.base import IMAGENET_MEAN, IMAGENET_STD, PatchEncoder, Preprocess
from methods.encoders.weights import (
    WeightsSpec,
    hub_errors,
    load_strict,
    no_init,
    parse_weights,
    read_state_dict,
    seeded_init,
)

TIMM_NAME = "resnet50.tv_in1k"
HUB_REPO = "timm/resnet50.tv_in1k"
UNUSED_PREFIXES = ("layer4.", "fc.")  # the parts of a full ResNet-50 checkpoint cut away here


class ResNet50Trunc(nn.Module):
    """conv1 .. layer3 of a timm ResNet-50, with its parameter names (so full ResNet-50 checkpoints,
    timm's or torchvision's, load after dropping layer4 and fc), then global average pooling."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def build_resnet50_trunc(spec: WeightsSpec) -> ResNet50Trunc:
    import timm

    if spec.kind == "hub":
        with hub_errors(HUB_REPO, "model.safetensors"):
            return ResNet50Trunc(timm.create_model(TIMM_NAME, pretrained=True))
    with no_init() if spec.kind == "path" else seeded_init():
        net = ResNet50Trunc(timm.create_model(TIMM_NAME, pretrained=False))
    if spec.kind == "path":
        state = {k: v for k, v in read_state_dict(spec.path).items() if not k.startswith(UNUSED_PREFIXES)}
        load_strict(net, state, f"resnet50_trunc (from {spec.path})")
    return net


@ENCODERS.register("resnet50_trunc", "ImageNet ResNet-50 (torchvision weights) cut after layer3, average pool, 1024-d (CLAM's R50)",
                   hub_repo=HUB_REPO)
def resnet50_trunc(weights: str | None = "hub", input_size: int | None = None) -> PatchEncoder:
    spec = parse_weights(weights)
    size = input_size or 224
    preprocess = Preprocess(input_size=size, resize_size=size, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return PatchEncoder("resnet50_trunc", build_resnet50_trunc(spec), 1024, preprocess, spec.provenance(HUB_REPO))
