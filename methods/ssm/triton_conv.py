"""Mamba's short convolution (causal depthwise conv1d + bias + SiLU) in Triton, forward and backward.

Why hand-written: causal-conv1d's channel-first kernel gives each (batch, channel) row to one thread
block that walks the sequence, like the stock scan, so at Pixel-Mamba's first layers (6-48 channels x
10^7 tokens) it keeps a few multiprocessors busy (23 ms forward + backward at 6 x 16.8 M on an H100, where
the bytes need ~0.2 ms); its channel-last kernel refuses channel counts that are not multiples of 8, and
PyTorch's depthwise conv computes the weight gradient at ~80 ms for that shape. Here every program
takes a tile of tokens x channels, so any shape fills the GPU; the op is memory-bound.

Layouts: x is read in its own strides (the mixer passes a transposed view of in_proj's output); the
output is a (batch, channels, L) view of (batch, L, channels) memory, which is what x_proj wants
(its input is the transposed view, contiguous, so the linear layer makes no copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A program takes TILE (token, channel) elements: up to 32 channels, the rest tokens (256 tokens at
# 5-8 channels, 64 at 32). A fixed tile keeps the backward's registers in check. Its sm_90 build
# (Triton 3.8, offline) spills, per thread: 256 B at 256 tokens x 8 channels (3.7 ms per call at 6 x
# 16.8 M on an H200); at 256 tokens, 1,176 B at 16 channels and 8,400 B at 32 (23.5 ms per call at
# 24 x 3.9 M on the H200); with this tile, 280 B at 16 and 192 B at 32 (not yet timed on a GPU).
TILE = 2048
MAX_BLOCK_E = 32


@triton.jit
def _tile(b_ptr, E, L, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """This program's tokens and channels (grid: token block x channel block x batch), their masks,
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
def _pre_activation(x_ptr, w_ptr, bias, t, e, tmask, emask, s_l, s_e, x_base, W: tl.constexpr,
                    BT: tl.constexpr, BE: tl.constexpr):
    """bias + sum_k w[e, k] x[t - (W - 1) + k], zero padding before the first token: [BT, BE] fp32."""
    acc = tl.zeros([BT, BE], dtype=tl.float32) + bias[None, :]
    for k in tl.static_range(W):
        src = t - (W - 1) + k
        m = ((src >= 0) & tmask)[:, None] & emask[None, :]
        xk = tl.load(x_ptr + x_base + src.to(tl.int64)[:, None] * s_l + e[None, :] * s_e, mask=m,
                     other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + e * W + k, mask=emask, other=0.0).to(tl.float32)
        acc += wk[None, :] * xk
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, E, L, s_b, s_e, s_l,
                     HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    t, e, pid_b, tmask, emask, bias = _tile(b_ptr, E, L, HAS_BIAS, BT, BE)
    pre = _pre_activation(x_ptr, w_ptr, bias, t, e, tmask, emask, s_l, s_e, pid_b * s_b, W, BT, BE)
    y = pre * tl.sigmoid(pre)
    offs = (pid_b * L + t.to(tl.int64))[:, None] * E + e[None, :]  # (batch, L, E) memory
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & emask[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, E, L, s_b, s_e, s_l,
                     g_b, g_e, g_l, HAS_BIAS: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                     BE: tl.constexpr):
    """dx[t] = sum_j w[W - 1 - j] dpre[t + j] with dpre = dy * silu'(pre), pre recomputed (the x reads
    repeat from cache); dw and dbias are summed per program into (programs, E, W) and (programs, E)."""
    t, e, pid_b, tmask, emask, bias = _tile(b_ptr, E, L, HAS_BIAS, BT, BE)
    dx = tl.zeros([BT, BE], dtype=tl.float32)
    for j in tl.static_range(W):
        s = t + j
        smask = s < L
        pre = _pre_activation(x_ptr, w_ptr, bias, s, e, smask, emask, s_l, s_e, pid_b * s_b, W, BT, BE)
        m = smask[:, None] & emask[None, :]
        dy = tl.load(dy_ptr + pid_b * g_b + s.to(tl.int64)[:, None] * g_l + e[None, :] * g_e, mask=m,
                     other=0.0).to(tl.float32)
        sig = tl.sigmoid(pre)
        dpre = tl.where(m, dy * sig * (1.0 + pre * (1.0 - sig)), 0.0)
        w_j = tl.load(w_ptr + e * W + (W - 1 - j), mask=emask, other=0.0).to(tl.float32)
        dx += w_j[None, :] * dpre
        if j == 0:  # the weight and bias gradients of this program's own tokens
            part = (pid_b * tl.num_programs(0) + tl.program_id(0)) * E + e
            tl.store(db_ptr + part, tl.sum(dpre, axis=0), mask=emask)
            for k in tl.static_range(W):
                src = t - (W - 1) + k
                mk = ((src >= 0) & tmask)[:, None] & emask[None, :]
                xk = tl.load(x_ptr + pid_b * s_b + src.to(tl.int64)[:, None] * s_l + e[None, :] * s_e,
                             mask=mk, other=0.0).to(tl.float32)
                tl.store(dw_ptr + part * W + k, tl.sum(dpre * xk, axis=0), mask=emask)
    offs = (pid_b * L + t.to(tl.int64))[:, None] * E + e[None, :]  # dx in (batch, L, E) memory
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=tmask[:, None] & emask[None, :])


def _grid(batch, channels, length):
    block_e = min(MAX_BLOCK_E, triton.next_power_of_2(channels))
    block_t = TILE // block_e
    return (triton.cdiv(length, block_t), triton.cdiv(channels, block_e), batch), block_t, block_e


def _channel_last_empty(batch, channels, length, like):
    """A (batch, channels, L) tensor stored as (batch, L, channels)."""
    return torch.empty(batch, length, channels, device=like.device, dtype=like.dtype).transpose(1, 2)


class TritonCausalConv1dSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        batch, channels, length = x.shape
        w = weight.reshape(channels, -1).contiguous()
        width = w.shape[1]
        y = _channel_last_empty(batch, channels, length, x)
        grid, block_t, block_e = _grid(batch, channels, length)
        _conv_fwd_kernel[grid](x, w, bias if bias is not None else w, y, channels, length, *x.stride(),
                               HAS_BIAS=bias is not None, W=width, BT=block_t, BE=block_e)
        ctx.save_for_backward(x, w, bias)
        ctx.weight_shape = weight.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, bias = ctx.saved_tensors
        batch, channels, length = x.shape
        width = w.shape[1]
        grid, block_t, block_e = _grid(batch, channels, length)
        parts = grid[0] * batch
        f32 = dict(device=x.device, dtype=torch.float32)
        dw_part = torch.empty(parts, channels, width, **f32)
        db_part = torch.empty(parts, channels, **f32)
        dx = _channel_last_empty(batch, channels, length, x)
        _conv_bwd_kernel[grid](x, w, bias if bias is not None else w, dy, dx, dw_part, db_part, channels,
                               length, *x.stride(), *dy.stride(), HAS_BIAS=bias is not None, W=width,
                               BT=block_t, BE=block_e)
        dw = dw_part.sum(0).reshape(ctx.weight_shape).to(w.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db


def causal_conv1d_silu_triton(x, weight, bias=None):
    """silu(causal depthwise conv1d(x) + bias): x (batch, E, L) CUDA, any strides; weight (E, 1, width)
    as nn.Conv1d's or (E, width); bias (E,) or None. Returns x's dtype, (batch, L, E) memory."""
    if x.dim() != 3 or weight.numel() % x.shape[1]:
        raise ValueError(f"causal conv1d: x must be (batch, channels, L) and weight (channels, 1, width), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    return TritonCausalConv1dSilu.apply(x, weight, bias)
