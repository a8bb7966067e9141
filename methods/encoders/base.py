"""What every patch encoder is: a network, its input preprocessing, and where its weights came from."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`, scale to [0, 1], normalise.

    Runs on batches of uint8 patches on the encoder's device (the GPU when there is one), so the
    DataLoader workers only read and decode. Antialiased interpolation, as PIL's resize that
    torchvision's transforms (CLAM, CONCH, TRIDENT) apply to each patch."""

    input_size: int
    resize_size: int
    interpolation: str  # "bilinear" | "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, H, W, 3) uint8 -> (B, 3, input_size, input_size) float32, normalised."""
        x = patches.permute(0, 3, 1, 2).float()
        height, width = x.shape[-2:]
        if min(height, width) != self.resize_size:
            scale = self.resize_size / min(height, width)
            size = (round(height * scale), round(width * scale))
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
            x = x.clamp(0, 255)  # bicubic overshoots; PIL clips to the uint8 range
        x = centre_crop(x, self.input_size)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255
        return (x - mean) / std

    def describe(self) -> dict:
        return asdict(self)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"cannot centre-crop {size} px from a {width}x{height} image; use a smaller input size")
    top, left = (height - size) // 2, (width - size) // 2
    return x[..., top : top + size, left : left + size]


class PatchEncoder(nn.Module):
    """A patch encoder: `forward(preprocessed (B, 3, S, S)) -> (B, embed_dim)`.

    weights: 'pretrained:<source>' or 'random' (the FoldOutput.weights convention)."""

    def __init__(self, name: str, net: nn.Module, embed_dim: int, preprocess: Preprocess, weights: str):
        super().__init__()
        self.name, self.embed_dim, self.preprocess, self.weights = name, embed_dim, preprocess, weights
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
