"""Mamba-1 mixers: Vision Mamba's bidirectional "bimamba v2" and MambaMIL's SRMamba.

Both follow mamba_ssm's `Mamba` module (in_proj d -> 2E giving x and the gate z, depthwise causal
conv1d + SiLU, x_proj -> (dt, B, C), dt_proj, S4D-real A, D skip, selective scan with softplus(dt +
bias), out_proj) with a second scan branch. Parameter names are those of Vim / MambaMIL, so their
checkpoints map one to one: conv1d, x_proj, dt_proj, A_log, D for the first branch and conv1d_b,
x_proj_b, dt_proj_b, A_b_log, D_b for the second. Input and output are (batch, L, d_model).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.ssm import backends_gpu
from methods.ssm.cuda import causal_conv1d_silu
from methods.ssm.scan import selective_scan


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_floor: float) -> None:
    # Mamba's init: weights keep the variance of dt; the bias is softplus^-1 of a step drawn
    # log-uniformly in [dt_min, dt_max], so that early training sees a spread of time scales.
    std = dt_rank ** -0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=dt_floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of the parameters the mixers mark `_no_weight_decay` (mamba_ssm's convention: A_log, D),
    for optimiser groups."""
    return {name for name, p in module.named_parameters() if getattr(p, "_no_weight_decay", False)}


def _fp32_or_wider(param):
    # The scan takes A, D and the dt bias in fp32 (as mamba_ssm), or fp64 for a float64 module.
    return param.to(torch.promote_types(param.dtype, torch.float32))


def fold_x_proj(x_proj_weight, dt_proj_weight, dtype):
    """x_proj with dt_proj folded in, in dtype: delta = W_dt (W_x[:R] u) = (W_dt W_x[:R]) u, so u is read
    once and the dt_rank-wide intermediate never leaves the kernel. The product is taken in the weights'
    precision and rounded to dtype once: as a broadcast product and sum, which autocast leaves alone (a
    matmul would need autocast switched off around it, a context that cProfile put at ~50 us of CPU a call
    while the GPU waits for the first branch; docs/gpu_notes.md, session 14)."""
    rank = dt_proj_weight.shape[1]
    delta_w = (dt_proj_weight.unsqueeze(2) * x_proj_weight[:rank].unsqueeze(0)).sum(1)
    return torch.cat((delta_w, x_proj_weight[rank:])).to(dtype)


def _matmul_dtype(x):
    """The dtype nn.Linear would compute x in: autocast's on x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _TwoBranchMamba(nn.Module):
    """Shared in_proj / out_proj and one or two scan branches ("" and "_b" parameter suffixes)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", branches=("", "_b"),
                 dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4, backend="auto"):
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand <= 0:
            raise ValueError(f"mixer: d_model, d_state, d_conv and expand must be positive, got {d_model}, "
                             f"{d_state}, {d_conv}, {expand}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        for suffix in branches:
            self._add_branch(suffix, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _add_branch(self, suffix, dt_min, dt_max, dt_init_floor):
        inner, state = self.d_inner, self.d_state
        conv = nn.Conv1d(inner, inner, self.d_conv, groups=inner, padding=self.d_conv - 1)  # as Mamba's
        self.add_module("conv1d" + suffix, conv)
        self.add_module("x_proj" + suffix, nn.Linear(inner, self.dt_rank + 2 * state, bias=False))
        dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
        self.add_module("dt_proj" + suffix, dt_proj)
        # S4D-real: A = -(1, 2, ..., N) for every channel, stored as log(-A) so that A stays negative
        A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        D = nn.Parameter(torch.ones(inner))
        A_log._no_weight_decay = D._no_weight_decay = True  # mamba_ssm's marker for optimiser groups
        self.register_parameter(f"A{suffix}_log", A_log)
        self.register_parameter("D" + suffix, D)

    def _scan_branch(self, x, z, suffix, linear=None, dtype=None):
        """One Mamba branch on x, z: (batch, E, L) -> gated scan output (batch, E, L).

        With `linear` (the token-wise map, see `_channel_linear`) the projections run channel-first in
        `dtype`, dt_proj folded into x_proj (`fold_x_proj`)."""
        conv, x_proj = getattr(self, "conv1d" + suffix), getattr(self, "x_proj" + suffix)
        dt_proj = getattr(self, "dt_proj" + suffix)
        x = causal_conv1d_silu(x, conv.weight, conv.bias)
        if linear is None:
            dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            delta = F.linear(dt, dt_proj.weight).transpose(1, 2)  # its bias enters the scan as delta_bias
            B, C = B.transpose(1, 2), C.transpose(1, 2)
        else:
            delta, B, C = linear(x, fold_x_proj(x_proj.weight, dt_proj.weight, dtype)).split(
                [self.d_inner, self.d_state, self.d_state], dim=1)
        A, D, delta_bias = self._scan_params(suffix)
        return selective_scan(x, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                              backend=self.backend)

    def _scan_params(self, suffix):
        """A = -exp(A_log), D and the dt bias of a branch, as the scan takes them."""
        A = -torch.exp(_fp32_or_wider(getattr(self, f"A{suffix}_log")))
        return (A, _fp32_or_wider(getattr(self, "D" + suffix)),
                _fp32_or_wider(getattr(self, "dt_proj" + suffix).bias))

    def _channel_first_branch(self, xz, suffix, linear, dtype):
        """`_scan_branch` on in_proj's channel-first output xz = [x | z], as one autograd node
        (methods/ssm/fused_branch.py) where the CUDA scan runs it."""
        conv = getattr(self, "conv1d" + suffix)
        needs_grad = torch.is_grad_enabled() and (xz.requires_grad or conv.weight.requires_grad)
        if not backends_gpu.fused_branch_supports(xz, self.d_state, self.d_conv, needs_grad,
                                                  self.backend):
            return self._scan_branch(*xz.split(self.d_inner, dim=1), suffix, linear, dtype)
        from methods.ssm.fused_branch import fused_branch  # imports triton: only when used

        dt_proj = getattr(self, "dt_proj" + suffix)
        return fused_branch(xz, conv.weight, conv.bias, getattr(self, "x_proj" + suffix).weight, dt_proj.weight,
                            getattr(self, f"A{suffix}_log"), getattr(self, "D" + suffix), dt_proj.bias)

    def _channel_linear(self, hidden):
        """Our token-wise linear map (CUDA or Triton by shape) where every projection of this mixer fits
        it on hidden's device and dtype, else None. Why: at Pixel-Mamba's narrow layers (3-48 model
        channels, 10^6-10^7 tokens) cuBLAS spent about 21 of a 73 ms bf16 mixer step on the projections
        (docs/gpu_notes.md)."""
        inner, state = self.d_inner, self.d_state
        return backends_gpu.channel_linear_for(hidden, _matmul_dtype(hidden), (2 * inner, self.d_model),
                                               (inner + 2 * state, inner), (self.d_model, inner))

    def _check_input(self, hidden):
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: input must be (batch, L, {self.d_model}), got "
                             f"{tuple(hidden.shape)}")


class BiMambaMixer(_TwoBranchMamba):
    """Vision Mamba's "bimamba v2": forward branch on the sequence, backward branch on the flipped
    sequence (flipped back), out_proj((y_fwd + y_bwd) / 2). bidirectional=False is a plain Mamba mixer.

    Deviation from Vim: dt_proj_b gets Mamba's dt init like dt_proj (Vim leaves it at nn.Linear's)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", bidirectional=True,
                 backend="auto"):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank,
                         branches=("", "_b") if bidirectional else ("",), backend=backend)
        self.bidirectional = bidirectional

    def forward(self, hidden):
        self._check_input(hidden)
        linear = self._channel_linear(hidden)
        if linear is not None:
            return self._forward_channel_first(hidden, linear)
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        y = self._scan_branch(x, z, "")
        if self.bidirectional:
            y = (y + self._scan_branch(x.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
        return self.out_proj(y.transpose(1, 2))

    def _forward_channel_first(self, hidden, linear):
        """forward's arithmetic with the token-wise Triton map: every tensor between in_proj and out_proj
        is channel-first (batch, C, L), and the backward branch reads in_proj's input and writes
        out_proj's output in reversed token order, so no flip is ever copied."""
        dtype = _matmul_dtype(hidden)
        xz, xz_b = self._in_proj_maps(hidden.transpose(1, 2), linear, dtype)
        y = self._channel_first_branch(xz, "", linear, dtype)
        w_out = self.out_proj.weight.to(dtype)  # after the first branch: the GPU waits for nothing it needs
        if not self.bidirectional:
            return linear(y, w_out, token_major_out=True).transpose(1, 2)
        y_b = self._channel_first_branch(xz_b, "_b", linear, dtype)
        half = w_out / 2  # out_proj((y + flip(y_b)) / 2): the flip is a read order
        from methods.ssm import cuda_channel  # imports triton: only when used

        if cuda_channel.linear_sum_supports(y, half):
            out = cuda_channel.linear_sum(y, y_b, half)
        else:  # as two maps
            out = linear(y, half, token_major_out=True) + linear(y_b, half, reverse=True, token_major_out=True)
        return out.transpose(1, 2)

    def _in_proj_maps(self, x, linear, dtype):
        """in_proj of x (batch, d_model, L), and for the backward branch of x read backwards (else None),
        channel-first in dtype. Both maps come first: the GPU runs them while Python prepares the
        branches' weights (at the start of a step it would otherwise wait for each small kernel,
        docs/gpu_notes.md session 10)."""
        from methods.ssm import cuda_channel  # imports triton: only when used

        if self.bidirectional and cuda_channel.linear_pair_supports(x, self.in_proj.weight, dtype):
            return cuda_channel.linear_pair(x, self.in_proj.weight, dtype)
        h, w_in = x.to(dtype), self.in_proj.weight.to(dtype)
        return linear(h, w_in), (linear(h, w_in, reverse=True) if self.bidirectional else None)


def sr_reorder(x, rate: int):
    """MambaMIL's sequence reordering on dim 1 of (batch, L, ...): zero-pad L to a multiple of `rate`,
    then take tokens 0, r, 2r, ..., then 1, 1 + r, ..., and so on (a stride-`rate` interleave)."""
    _check_rate(rate)
    batch, length = x.shape[:2]
    groups = -(-length // rate)
    if groups * rate > length:
        x = torch.cat((x, x.new_zeros(batch, groups * rate - length, *x.shape[2:])), dim=1)
    return x.unflatten(1, (groups, rate)).transpose(1, 2).flatten(1, 2)


def sr_restore(y, rate: int, length: int):
    """Inverse of `sr_reorder`: back to the original order, padding dropped -> (batch, length, ...)."""
    _check_rate(rate)
    groups = -(-length // rate)
    if y.shape[1] != groups * rate:
        raise ValueError(f"sr_restore: dim 1 must be {groups * rate} (length {length} padded to a multiple "
                         f"of rate {rate}), got {y.shape[1]}")
    return y.unflatten(1, (rate, groups)).transpose(1, 2).flatten(1, 2)[:, :length]


def _check_rate(rate):
    if not isinstance(rate, int) or rate < 1:
        raise ValueError(f"SRMamba rate must be a positive integer, got {rate!r}")


class SRMambaMixer(_TwoBranchMamba):
    """MambaMIL's SRMamba: branch 1 scans the sequence, branch 2 the `sr_reorder`ed sequence (its output
    put back by `sr_restore`), out_proj(y1 + y2). As in MambaMIL, the reordering is applied to the
    in_proj output (x and gate z), whose zero padding takes part in branch 2's scan.

    mambamil_init=True reproduces MambaMIL's model-wide init, which also reaches this module: every
    Linear gets Xavier-normal weights and zero bias (so dt_proj's bias is 0, not Mamba's dt init)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, rate=5, dt_rank="auto", mambamil_init=True,
                 backend="auto"):
        _check_rate(rate)
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, backend=backend)
        self.rate = rate
        if mambamil_init:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_normal_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, hidden):
        self._check_input(hidden)
        length = hidden.shape[1]
        xz = self.in_proj(hidden)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)
        y = self._scan_branch(x, z, "").transpose(1, 2)
        x_r, z_r = sr_reorder(xz, self.rate).transpose(1, 2).chunk(2, dim=1)
        y_r = sr_restore(self._scan_branch(x_r, z_r, "_b").transpose(1, 2), self.rate, length)
        return self.out_proj(y + y_r)
