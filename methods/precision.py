"""Mixed precision, the same for every trainer and encoder of the benchmark (benchmark/ imports it too)."""
from __future__ import annotations

import torch


def bf16_autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on a CUDA device; a disabled context elsewhere, so that CPU runs stay in float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
