"""TEMPORARY test-only stand-in for methods.ssm.mixer.BiMambaMixer (same constructor and parameter
shapes, a cheap causal-mean mixer instead of the selective scan). Removed once the ssm branch lands."""
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


class BiMambaMixer(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", bidirectional=True):
        super().__init__()
        e = expand * d_model
        r = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.r = r
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.out_proj = nn.Linear(e, d_model, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1))
            setattr(self, "x_proj" + suffix, nn.Linear(e, r + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(r, e))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(e)))
        self.A_log = nn.Parameter(torch.zeros(e, d_state))
        self.A_b_log = nn.Parameter(torch.zeros(e, d_state))

    def _branch(self, x, suffix):
        L = x.shape[1]
        xc = F.silu(getattr(self, "conv1d" + suffix)(x.transpose(1, 2))[..., :L].transpose(1, 2))
        dt = F.softplus(getattr(self, "dt_proj" + suffix)(getattr(self, "x_proj" + suffix)(xc)[..., : self.r]))
        mean = xc.cumsum(1) / torch.arange(1, L + 1, device=x.device).view(1, L, 1)
        return xc * getattr(self, "D" + suffix) + dt * mean

    def forward(self, h):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        y = self._branch(x, "") + self._branch(x.flip(1), "_b").flip(1)
        return self.out_proj(y / 2 * F.silu(z))


def install():
    try:
        import methods.ssm.mixer  # noqa: F401
    except ImportError:
        sys.modules.setdefault("methods.ssm", types.ModuleType("methods.ssm"))
        module = types.ModuleType("methods.ssm.mixer")
        module.BiMambaMixer = BiMambaMixer
        sys.modules["methods.ssm.mixer"] = module
