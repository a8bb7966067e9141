"""A token-wise linear map y[:, t] = W x[:, t] over (batch, channels, L) tensors with few channels, in
Triton, forward and backward.

Why hand-written: Pixel-Mamba's first mixers project 3-96 channels per token over 10^6-10^7 tokens
(in_proj, x_proj, dt_proj, out_proj). cuBLAS splits such a tall, thin product into dozens of launches
with 64 x 64 tiles over a K of 3-6, and reduces the weight gradient over 10^7 tokens with split-K
kernels: about 21 ms of a 73 ms mixer step at 6 channels x 16.8 M tokens on an H200
(docs/gpu_notes.md), where the bytes need well under a millisecond. Here one program takes a tile of
tokens and all of K, and the backward writes dx and per-program partial sums of dW in one pass over
dy and x: the op is memory-bound.

Layouts: x, y and dy are read and written in their own strides, so a (batch, L, C) tensor is passed
as its transposed view and a channel-first result can be written into (batch, L, C) memory. With
`reverse`, y[:, t] = W x[:, L - 1 - t]: the flip of Vision Mamba's backward branch costs no copy.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from methods.ssm.backends_gpu import triton_interpreting

MAX_IN = 128     # K: all of it in one tile
MAX_OUT = 256    # N: the backward holds all of it in one tile
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Where it beats cuBLAS: 16-bit tiles go through the tensor cores. float32 ones take tl.dot's exact FMA
# path, whose backward ran 10-50x slower than cuBLAS on an H200 (docs/gpu_notes.md): correct, but the
# mixers keep float32 on matmuls.
FAST_DTYPES = (torch.bfloat16, torch.float16)
FWD_BLOCK_N = 64
TILE = 8192      # elements of the largest [rows, tokens] tile a program holds
# Tokens per tile and backward programs: the best of a sweep on an H200 at the 6-channel layer's
# shapes (docs/gpu_notes.md, session 4).
FWD_MAX_L = 256
BWD_MAX_L = 128
PARTIALS = 4096  # programs of the backward, each summing dW over its stretch of tokens


@triton.jit
def _src(t, L, REVERSE: tl.constexpr):
    """The tokens of x that tokens t of y read."""
    if REVERSE:
        return L - 1 - t
    return t


@triton.jit
def _load_rows(ptr, base, rows, n_rows, tok, tmask, s_row, s_tok, UPCAST: tl.constexpr):
    """[len(rows), len(tok)] tile of a strided (batch, rows, L) tensor, zero outside."""
    offs = base + rows.to(tl.int64)[:, None] * s_row + tok.to(tl.int64)[None, :] * s_tok
    tile = tl.load(ptr + offs, mask=(rows < n_rows)[:, None] & tmask[None, :], other=0.0)
    return _upcast(tile, UPCAST)


@triton.jit
def _upcast(tile, UPCAST: tl.constexpr):
    # Triton's CPU interpreter multiplies bf16 tiles wrongly in tl.dot (garbage of order 1e10, Triton
    # 3.8), so under the interpreter the tiles go to float32 first; on a GPU they stay 16-bit.
    if UPCAST:
        return tile.to(tl.float32)
    return tile


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, K, N, L, sx_b, sx_k, sx_l, sy_b, sy_n, sy_l,
                REVERSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    t = tl.program_id(0) * BL + tl.arange(0, BL)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    b = tl.program_id(2).to(tl.int64)
    tmask = t < L
    x = _load_rows(x_ptr, b * sx_b, k, K, _src(t, L, REVERSE), tmask, sx_k, sx_l, UPCAST)
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
    y = tl.dot(_upcast(w, UPCAST), x, input_precision=PRECISION)
    offs = b * sy_b + n.to(tl.int64)[:, None] * sy_n + t.to(tl.int64)[None, :] * sy_l
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=(n < N)[:, None] & tmask[None, :])


@triton.jit
def _bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, K, N, L, span, sx_b, sx_k, sx_l, sg_b, sg_n, sg_l,
                REVERSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    """dx = W^T dy over this program's `span` tokens, written contiguous (batch, K, L); the program's
    sum of dy x^T goes to its slot of dw (batch x programs, N, K) in float32."""
    k = tl.arange(0, BK)
    n = tl.arange(0, BN)
    b = tl.program_id(1).to(tl.int64)
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
    w_t = tl.trans(_upcast(w, UPCAST))
    dw = tl.zeros([BN, BK], dtype=tl.float32)
    start = tl.program_id(0) * span
    for c in range(start, tl.minimum(start + span, L), BL):
        t = c + tl.arange(0, BL)
        tmask = t < L
        src = _src(t, L, REVERSE)
        dy = _load_rows(dy_ptr, b * sg_b, n, N, t, tmask, sg_n, sg_l, UPCAST)
        x = _load_rows(x_ptr, b * sx_b, k, K, src, tmask, sx_k, sx_l, UPCAST)
        dx = tl.dot(w_t, dy, input_precision=PRECISION)
        offs = (b * K + k.to(tl.int64))[:, None] * L + src.to(tl.int64)[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=(k < K)[:, None] & tmask[None, :])
        dw = tl.dot(dy, tl.trans(x), dw, input_precision=PRECISION)
    slot = b * tl.num_programs(0) + tl.program_id(0)
    tl.store(dw_ptr + slot * N * K + n[:, None] * K + k[None, :], dw,
             mask=(n < N)[:, None] & (k < K)[None, :])


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every side >= 16


def _precision(dtype) -> str:
    # fp32 stays fp32 (no TF32 rounding, the CPU path's numbers); bf16 / fp16 use the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def new_output(x, n_out: int, token_major_out: bool):
    """The (batch, n_out, L) output of a map of x: channel-first, or (batch, L, n_out) memory."""
    batch, _, length = x.shape
    if token_major_out:
        return x.new_empty(batch, length, n_out).transpose(1, 2)
    return x.new_empty(batch, n_out, length)


def linear_forward(x, w, reverse: bool, token_major_out: bool):
    """y = w x token by token (the kernel behind `channel_linear`, without autograd)."""
    batch, k_in, length = x.shape
    n_out = w.shape[0]
    y = new_output(x, n_out, token_major_out)
    block_k, block_n = _block(k_in), min(FWD_BLOCK_N, _block(n_out))
    block_l = max(16, min(FWD_MAX_L, TILE // max(block_k, block_n)))
    grid = (triton.cdiv(length, block_l), triton.cdiv(n_out, block_n), batch)
    _fwd_kernel[grid](x, w, y, k_in, n_out, length, *x.stride(), *y.stride(), REVERSE=reverse,
                      PRECISION=_precision(x.dtype), UPCAST=triton_interpreting(), BK=block_k,
                      BN=block_n, BL=block_l)
    return y


def linear_backward(x, w, dy, reverse: bool):
    """(dx, dw) of `linear_forward` for the gradient dy: dx contiguous (batch, K, L), dw in w's dtype."""
    batch, k_in, length = x.shape
    n_out = w.shape[0]
    block_k, block_n = _block(k_in), _block(n_out)
    block_l = max(16, min(BWD_MAX_L, TILE // max(block_k, block_n)))
    programs = max(1, min(triton.cdiv(length, block_l), PARTIALS // batch))
    span = triton.cdiv(triton.cdiv(length, programs), block_l) * block_l
    programs = triton.cdiv(length, span)
    dx = torch.empty(batch, k_in, length, device=x.device, dtype=x.dtype)
    dw_part = torch.empty(batch * programs, n_out, k_in, device=x.device, dtype=torch.float32)
    _bwd_kernel[(programs, batch)](x, w, dy, dx, dw_part, k_in, n_out, length, span, *x.stride(),
                                   *dy.stride(), REVERSE=reverse, PRECISION=_precision(x.dtype),
                                   UPCAST=triton_interpreting(), BK=block_k, BN=block_n, BL=block_l)
    return dx, dw_part.sum(0).to(w.dtype)


class ChannelLinear(torch.autograd.Function):
    """Autograd over a pair of kernels: `kernels` is a module with linear_forward / linear_backward
    (this one, or methods/ssm/cuda_channel.py)."""

    @staticmethod
    def forward(ctx, x, weight, reverse, token_major_out, kernels):
        w = weight.contiguous()
        ctx.save_for_backward(x, w)
        ctx.reverse, ctx.kernels = reverse, kernels
        return kernels.linear_forward(x, w, reverse, token_major_out)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return (*ctx.kernels.linear_backward(x, w, dy, ctx.reverse), None, None, None)


def supports(in_features: int, out_features: int) -> bool:
    return in_features <= MAX_IN and out_features <= MAX_OUT


def channel_linear(x, weight, reverse: bool = False, token_major_out: bool = False, kernels=None):
    """y[:, :, t] = weight @ x[:, :, t'] with t' = t, or L - 1 - t with `reverse`.

    x: (batch, K, L) in any strides, float32 / bfloat16 / float16; weight: (N, K) of x's dtype (cast it
    first under autocast). Returns (batch, N, L) in x's dtype, stored channel-first, or as (batch, L, N)
    memory with `token_major_out`. K <= 128, N <= 256. kernels: the module whose linear_forward /
    linear_backward run it (default: this one's Triton kernels)."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"channel_linear: x must be (batch, K, L) and weight (N, K), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"channel_linear: x and weight must share one of {DTYPES}, got {x.dtype} and "
                         f"{weight.dtype}")
    if not supports(weight.shape[1], weight.shape[0]):
        raise ValueError(f"channel_linear: at most {MAX_IN} inputs and {MAX_OUT} outputs, got weight "
                         f"{tuple(weight.shape)}; use a matmul")
    return ChannelLinear.apply(x, weight, bool(reverse), bool(token_major_out), kernels or sys.modules[__name__])
