"""The CUDA token-wise ops of the mixers (methods/ssm/csrc/channel_ops.cu, built into the CUDA scan's
extension): the short causal convolution with SiLU, and the linear maps of the narrowest layers.

Each has a plain forward / backward pair (what the mixer's fused branch, methods/ssm/fused_branch.py,
calls) and an autograd wrapper. Where the extension is missing or a shape is not compiled, the Triton
kernels (methods/ssm/triton_conv.py, methods/ssm/triton_linear.py) run instead: `channel_linear` and
`causal_conv1d_silu` pick. Timings: docs/performance.md, session 8.
"""
from __future__ import annotations

import sys

import torch

from methods.ssm import cuda_scan, triton_linear
from methods.ssm.triton_conv import causal_conv1d_silu_triton

CONV_WIDTHS = (2, 3, 4)
DTYPES = (torch.float32, torch.bfloat16)
CONV_TOKENS_PER_BLOCK = 128 * 8  # channel_ops.cu: kConvThreads x kChunk


def _ext():
    return cuda_scan.extension()


def _tokens_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------------
# convolution


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension: batch x channels (conv), batch (linear)


def conv_runs(batch: int, channels: int, width: int, dtype) -> bool:
    """Whether the CUDA convolution is compiled for this width and dtype and its grid fits the rows."""
    return (dtype in DTYPES and width in CONV_WIDTHS and batch * channels <= MAX_GRID_Y
            and _ext() is not None)


def conv_supports(x, weight) -> bool:
    return (x.is_cuda and weight.numel() == x.shape[1] * weight.shape[-1]
            and conv_runs(x.shape[0], x.shape[1], weight.shape[-1], x.dtype))


def _conv_weights(weight, bias, channels):
    return (weight.reshape(channels, -1).float().contiguous(),
            None if bias is None else bias.float().contiguous())


def conv_forward(x, weight, bias=None):
    """silu(causal depthwise conv1d(x) + bias) as contiguous (batch, E, L) in x's dtype."""
    x = _tokens_contiguous(x)
    w, b = _conv_weights(weight, bias, x.shape[1])
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _ext().conv_fwd(x, w, b, y)
    return y


def conv_proj_forward(x, weight, bias, w_proj):
    """(u, proj): u = `conv_forward`(x, weight, bias) and proj = w_proj u (batch, N, L), one kernel where
    it is compiled for (E, N) (the mixer's x_proj at 6 and 12 inner channels: the projection reads u
    from registers, not memory), else the two maps one after the other."""
    ext = _ext()
    if not (conv_supports(x, weight) and ext.conv_proj_supports(x.shape[1], w_proj.shape[0])):
        u = conv_forward(x, weight, bias)
        return u, linear_forward(u, w_proj, False, False)
    x = _tokens_contiguous(x)
    w, b = _conv_weights(weight, bias, x.shape[1])
    u = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    proj = torch.empty(x.shape[0], w_proj.shape[0], x.shape[2], device=x.device, dtype=x.dtype)
    ext.conv_proj_fwd(x, w, b, u, w_proj.float().contiguous(), proj)
    return u, proj


def conv_backward(x, weight, bias, dy, dy2=None, dx=None):
    """(dx, dweight, dbias) of `conv_forward` for the gradient dy (+ dy2) at its output; dx may be a
    buffer to write into (token stride 1), e.g. a slice of the mixer's in_proj gradient."""
    x, dy = _tokens_contiguous(x), _tokens_contiguous(dy)
    dy2 = None if dy2 is None else _tokens_contiguous(dy2)
    batch, channels, length = x.shape
    w, b = _conv_weights(weight, bias, channels)
    if dx is None:
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    blocks = -(-length // CONV_TOKENS_PER_BLOCK)
    dw_part = torch.empty(blocks, batch, channels, w.shape[1], device=x.device, dtype=torch.float32)
    db_part = torch.empty(blocks, batch, channels, device=x.device, dtype=torch.float32)
    _ext().conv_bwd(x, w, b, dy, dy2, dx, dw_part, db_part)
    dw = dw_part.sum((0, 1)).reshape(weight.shape).to(weight.dtype)
    return dx, dw, None if bias is None else db_part.sum((0, 1)).to(bias.dtype)


def causal_conv1d_silu(x, weight, bias=None):
    """silu(causal depthwise conv1d(x) + bias) on CUDA: this kernel where it is compiled for the shape,
    else the Triton one. x (batch, E, L), weight (E, 1, width) or (E, width), bias (E,) or None."""
    kernels = sys.modules[__name__] if conv_supports(x, weight) else None  # None: the Triton kernels
    return causal_conv1d_silu_triton(x, weight, bias, kernels=kernels)


# ---------------------------------------------------------------------------------------------------
# linear maps


def linear_supports(x, weight) -> bool:
    """Whether the CUDA kernel is compiled for this (N, K) weight and x's dtype."""
    ext = _ext() if x.is_cuda and x.dtype in DTYPES and x.shape[0] <= MAX_GRID_Y else None
    return ext is not None and ext.linear_supports(weight.shape[1], weight.shape[0])


def linear_forward(x, w, reverse: bool, token_major_out: bool):
    """triton_linear.linear_forward's map, by the CUDA kernel where it is compiled for w's shape."""
    if not linear_supports(x, w):
        return triton_linear.linear_forward(x, w, reverse, token_major_out)
    y = triton_linear.new_output(x, w.shape[0], token_major_out)
    _ext().linear_fwd(x, w.float().contiguous(), y, reverse, None, None)
    return y


def linear_backward(x, w, dy, reverse: bool, dy2=None):
    """(dx, dw) of `linear_forward`; dx in x's layout where x is dense. dy2: the gradient at the same map
    of x read the other way, added in (`linear_pair`, which runs only where the CUDA kernel does)."""
    if not linear_supports(x, w):
        assert dy2 is None, "only the CUDA kernel adds a second gradient"
        return triton_linear.linear_backward(x, w, dy, reverse)
    batch, _, length = x.shape
    dx = torch.empty_like(x)
    blocks = _ext().linear_blocks(length)
    dw_part = torch.empty(batch * blocks, *w.shape, device=x.device, dtype=torch.float32)
    _ext().linear_bwd(x, w.float().contiguous(), dy, dx, dw_part, reverse, dy2)
    return dx, dw_part.sum(0).to(w.dtype)


def channel_linear(x, weight, reverse: bool = False, token_major_out: bool = False):
    """`triton_linear.channel_linear` (same arguments and checks), by the CUDA kernel where it is
    compiled for the weight's shape."""
    return triton_linear.channel_linear(x, weight, reverse, token_major_out, kernels=sys.modules[__name__])


# ---------------------------------------------------------------------------------------------------
# Vision Mamba's two in_proj maps


def linear_pair_supports(x, weight, dtype) -> bool:
    """Whether `linear_pair` runs x (batch, K, L), a float32 or bfloat16 token-major view (the mixer's
    input, transposed), with weight (N, K), in dtype: bfloat16 and a compiled shape."""
    return (x.dtype in DTYPES and dtype == torch.bfloat16 and x.dim() == 3 and x.stride(1) == 1
            and x.stride(2) == x.shape[1] and linear_supports(x, weight))


class LinearPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, dtype):
        w = weight.to(dtype).float().contiguous()  # rounded as a map in dtype rounds it
        batch, _, length = x.shape
        y, y_b = (torch.empty(batch, w.shape[0], length, device=x.device, dtype=dtype) for _ in range(2))
        _ext().linear_fwd(x, w, y, False, None, y_b)  # y_b is y backwards: one read of x
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        return y, y_b

    @staticmethod
    def backward(ctx, dy, dy_b):
        x, w = ctx.saved_tensors
        dx, dw = linear_backward(x, w, _tokens_contiguous(dy), False, _tokens_contiguous(dy_b))
        return dx, dw.to(ctx.weight_dtype), None


def linear_pair(x, weight, dtype):
    """(y, y_b) = (weight x[:, :, t], weight x[:, :, L - 1 - t]) in dtype, channel-first (batch, N, L):
    Vision Mamba's two in_proj maps, reading the float32 input as it is (no cast to dtype first) and once
    for both (y_b is y written backwards), and writing one float32 gradient for both (no cast back, no
    sum of two gradients): 0.28 ms of a 22 ms mixer step at 6 channels x 16.8 M tokens
    (docs/performance.md, session 13). Only where `linear_pair_supports`."""
    return LinearPair.apply(x, weight, dtype)


# ---------------------------------------------------------------------------------------------------
# Vision Mamba's out_proj of its two branches


def linear_sum_supports(x, weight) -> bool:
    """Whether `linear_sum` runs x (batch, K, L), channel-first, with weight (N, K): a compiled shape."""
    return x.dim() == 3 and x.stride(2) == 1 and linear_supports(x, weight)


class LinearSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x2, weight):
        w = weight.float().contiguous()
        y = triton_linear.new_output(x, w.shape[0], token_major_out=True)
        _ext().linear_fwd(x, w, y, False, x2, None)
        ctx.save_for_backward(x, x2, w)
        ctx.weight_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x2, w = ctx.saved_tensors
        dx, dw = linear_backward(x, w, dy, False)
        dx2, dw2 = linear_backward(x2, w, dy, True)
        return dx, dx2, (dw + dw2).to(ctx.weight_dtype)


def linear_sum(x, x2, weight):
    """weight x[:, :, t] + weight x2[:, :, L - 1 - t] as a token-major (batch, N, L) view in x's dtype:
    Vision Mamba's out_proj of its two branches, the second read backwards, in one pass (no second map
    and no sum of two outputs). x2 like x (channel-first, same shape and dtype); only where
    `linear_sum_supports`."""
    if x2.shape != x.shape or x2.dtype != x.dtype or x2.stride(2) != 1:
        raise ValueError(f"linear_sum: x2 must be shaped and typed like x, channel-first; got {tuple(x2.shape)} "
                         f"{x2.dtype} and {tuple(x.shape)} {x.dtype}")
    return LinearSum.apply(x, x2, weight)
