"""Mamba's short convolution (causal depthwise conv1d + bias + SiLU) in Triton, forward and backward.

Why hand-written: causal-conv1d's channel-first kernel gives each (batch, channel) row to one thread
block that walks the sequence, like the stock scan, so at Pixel-Mamba's first layers (6-48 channels x
10^7 tokens) it keeps a few multiprocessors busy (23 ms forward + backward at 6 x 16.8 M on an H100, where
the bytes need ~0.2 ms); its channel-last kernel refuses channel counts that are not multiples of 8, and
PyTorch's depthwise conv computes the weight gradient at ~80 ms for that shape. Here every program
takes a tile of channels x tokens, so any shape fills the GPU.

Layouts: x, dy are read in their own strides; y and dx are written channel-first (batch, channels, L)
contiguous, what the mixer's token-wise projections and the scan read fastest. A program's tile is
[channels, tokens] with the tokens along a warp's lanes, so channel-first rows are read and written in
whole sectors.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

# A program takes TILE (channel, token) elements over NUM_WARPS warps: 8 per thread, which keeps the
# backward (it holds an x window of 2W - 1 tokens and recomputes W pre-activations) out of local memory.
TILE = 1024
NUM_WARPS = 4
MAX_BLOCK_E = 8


@triton.jit
def _tile(b_ptr, E, L, HAS_BIAS: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """This program's channels and tokens (grid: token block x channel block x batch), their masks,
    and the channels' bias (zero without one)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    tmask = t < L
    emask = e < E
    bias = tl.zeros([BE], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + e, mask=emask, other=0.0).to(tl.float32)
    return t, e, tl.program_id(2).to(tl.int64), tmask, emask, bias


@triton.jit
def _weights(w_ptr, e, emask, W: tl.constexpr):
    """The W taps of the program's channels, a tuple of [BE] fp32."""
    ws = ()
    for k in tl.static_range(W):
        ws = ws + (tl.load(w_ptr + e * W + k, mask=emask, other=0.0).to(tl.float32),)
    return ws


@triton.jit
def _x_window(x_ptr, x_base, e, t, emask, L, s_e, s_l, W: tl.constexpr, COUNT: tl.constexpr):
    """x at tokens t - (W - 1) + i for i < COUNT, a tuple of [BE, BT] fp32 tiles, zero outside [0, L)
    (before the first token: the causal padding). Loaded once, shared by every pre-activation."""
    rows = x_base + e.to(tl.int64)[:, None] * s_e
    xs = ()
    for i in tl.static_range(COUNT):
        src = t - (W - 1) + i
        m = emask[:, None] & ((src >= 0) & (src < L))[None, :]
        xs = xs + (tl.load(x_ptr + rows + src.to(tl.int64)[None, :] * s_l, mask=m, other=0.0).to(tl.float32),)
    return xs


@triton.jit
def _pre_activation(ws, xs, bias, j: tl.constexpr, W: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """bias + sum_k w[k] x[t + j - (W - 1) + k] (the pre-activation at token t + j): [BE, BT] fp32."""
    acc = tl.zeros([BE, BT], dtype=tl.float32) + bias[:, None]
    for k in tl.static_range(W):
        acc += ws[k][:, None] * xs[j + k]
    return acc


@triton.jit
def _channel_first(e, t, pid_b, E, L):
    """Offsets of (e, t) in contiguous (batch, E, L) memory."""
    return (pid_b * E + e.to(tl.int64))[:, None] * L + t.to(tl.int64)[None, :]


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, E, L, s_b, s_e, s_l,
                     HAS_BIAS: tl.constexpr, W: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    t, e, pid_b, tmask, emask, bias = _tile(b_ptr, E, L, HAS_BIAS, BE, BT)
    xs = _x_window(x_ptr, pid_b * s_b, e, t, emask, L, s_e, s_l, W, W)
    pre = _pre_activation(_weights(w_ptr, e, emask, W), xs, bias, 0, W, BE, BT)
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + _channel_first(e, t, pid_b, E, L), y.to(y_ptr.dtype.element_ty),
             mask=emask[:, None] & tmask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, E, L, s_b, s_e, s_l,
                     g_b, g_e, g_l, HAS_BIAS: tl.constexpr, W: tl.constexpr, BE: tl.constexpr,
                     BT: tl.constexpr):
    """dx[t] = sum_j w[W - 1 - j] dpre[t + j] with dpre = dy * silu'(pre), the pre-activations at
    t .. t + W - 1 recomputed from one x window of 2W - 1 tokens; dw and dbias of the program's own
    tokens are summed into (programs, E, W) and (programs, E)."""
    t, e, pid_b, tmask, emask, bias = _tile(b_ptr, E, L, HAS_BIAS, BE, BT)
    ws = _weights(w_ptr, e, emask, W)
    xs = _x_window(x_ptr, pid_b * s_b, e, t, emask, L, s_e, s_l, W, 2 * W - 1)
    g_rows = pid_b * g_b + e.to(tl.int64)[:, None] * g_e
    dx = tl.zeros([BE, BT], dtype=tl.float32)
    own = tl.zeros([BE, BT], dtype=tl.float32)
    for j in tl.static_range(W):
        s = t + j
        m = emask[:, None] & (s < L)[None, :]
        dy = tl.load(dy_ptr + g_rows + s.to(tl.int64)[None, :] * g_l, mask=m, other=0.0).to(tl.float32)
        pre = _pre_activation(ws, xs, bias, j, W, BE, BT)
        sig = tl.sigmoid(pre)
        dpre = tl.where(m, dy * sig * (1.0 + pre * (1.0 - sig)), 0.0)
        dx += ws[W - 1 - j][:, None] * dpre
        if j == 0:
            own = dpre
    part = (pid_b * tl.num_programs(0) + tl.program_id(0)) * E + e
    tl.store(db_ptr + part, tl.sum(own, axis=1), mask=emask)
    for k in tl.static_range(W):
        tl.store(dw_ptr + part * W + k, tl.sum(own * xs[k], axis=1), mask=emask)
    tl.store(dx_ptr + _channel_first(e, t, pid_b, E, L), dx.to(dx_ptr.dtype.element_ty),
             mask=emask[:, None] & tmask[None, :])


def _grid(batch, channels, length):
    block_e = min(MAX_BLOCK_E, triton.next_power_of_2(channels))
    block_t = TILE // block_e
    return (triton.cdiv(length, block_t), triton.cdiv(channels, block_e), batch), block_e, block_t


def conv_forward(x, weight, bias=None):
    """silu(causal depthwise conv1d(x) + bias) as contiguous (batch, E, L) in x's dtype (no autograd)."""
    batch, channels, length = x.shape
    w = weight.reshape(channels, -1).contiguous()
    y = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    grid, block_e, block_t = _grid(batch, channels, length)
    _conv_fwd_kernel[grid](x, w, bias if bias is not None else w, y, channels, length, *x.stride(),
                           HAS_BIAS=bias is not None, W=w.shape[1], BE=block_e, BT=block_t,
                           num_warps=NUM_WARPS)
    return y


def conv_backward(x, weight, bias, dy):
    """(dx, dweight, dbias) of `conv_forward` for the gradient dy at its output; dx contiguous."""
    batch, channels, length = x.shape
    w = weight.reshape(channels, -1).contiguous()
    width = w.shape[1]
    grid, block_e, block_t = _grid(batch, channels, length)
    parts = grid[0] * batch
    f32 = dict(device=x.device, dtype=torch.float32)
    dw_part = torch.empty(parts, channels, width, **f32)
    db_part = torch.empty(parts, channels, **f32)
    dx = torch.empty(batch, channels, length, device=x.device, dtype=x.dtype)
    _conv_bwd_kernel[grid](x, w, bias if bias is not None else w, dy, dx, dw_part, db_part, channels,
                           length, *x.stride(), *dy.stride(), HAS_BIAS=bias is not None, W=width,
                           BE=block_e, BT=block_t, num_warps=NUM_WARPS)
    dw = dw_part.sum(0).reshape(weight.shape).to(weight.dtype)
    return dx, dw, db_part.sum(0).to(bias.dtype) if bias is not None else None


class CausalConv1dSilu(torch.autograd.Function):
    """Autograd over a pair of kernels: `kernels` is a module with conv_forward / conv_backward (this
    one, or methods/ssm/cuda_channel.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        ctx.save_for_backward(x, weight, bias)
        ctx.kernels = kernels
        return kernels.conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        return (*ctx.kernels.conv_backward(x, weight, bias, dy), None)


def causal_conv1d_silu_triton(x, weight, bias=None, kernels=None):
    """silu(causal depthwise conv1d(x) + bias): x (batch, E, L) CUDA, any strides; weight (E, 1, width)
    as nn.Conv1d's or (E, width); bias (E,) or None. Returns x's dtype, contiguous (batch, E, L).
    kernels: the module whose conv_forward / conv_backward run it (default: this one's Triton kernels)."""
    if x.dim() != 3 or weight.numel() % x.shape[1]:
        raise ValueError(f"causal conv1d: x must be (batch, channels, L) and weight (channels, 1, width), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    return CausalConv1dSilu.apply(x, weight, bias, kernels or sys.modules[__name__])
