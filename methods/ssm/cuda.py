"""mamba_ssm / causal_conv1d kernels, imported lazily, with their length limits enforced.

Neither package imports without its compiled CUDA extension (and mamba_ssm needs triton), so they are
imported on the first CUDA call only; on other machines this module is pure PyTorch.

Length limits of mamba-ssm 2.3 and causal-conv1d 1.7 (csrc/*.h use uint32 strides and int offsets):
  * selective scan: L is a C int; element offsets batch x E x L and batch x N x L (u, delta, z, out,
    B, C) are uint32; the offset into the saved chunk states, batch x E x ceil(L/2048) x N, is int32.
  * causal conv1d: L is a C int; batch x E x L is a uint32 offset.
Past them the kernels return wrong numbers without an error. We split the sequence into segments that
fit. The stock scan kernel cannot start from a given state, so each segment runs from zero and we add
the carried state's effect ourselves (`scan_in_segments`, exact: the recurrence is linear in h).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from methods.ssm import backends_gpu
from methods.ssm.scan import ScanInfo, compute_dtype, effective_delta, final_state, initial_state_readout

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
KERNEL_CHUNK = 2048  # tokens per chunk of the selective-scan kernel for long sequences

INSTALL_HINT = ("install the `gpu` extra (mamba-ssm, causal-conv1d built for this CUDA; see docs/ssm.md) "
                "or pass backend='reference'")


@functools.lru_cache(maxsize=None)
def _import_selective_scan():
    """(selective_scan_fn, None) or (None, reason)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or OSError/RuntimeError from a broken CUDA extension
        return None, f"{type(err).__name__}: {err}"
    return selective_scan_fn, None


@functools.lru_cache(maxsize=None)
def _import_causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
    return causal_conv1d_fn, None


def scan_kernel_available() -> bool:
    return torch.cuda.is_available() and _import_selective_scan()[0] is not None


def conv_kernel_available() -> bool:
    return torch.cuda.is_available() and _import_causal_conv1d()[0] is not None


# ---------------------------------------------------------------------------------------------------
# Selective scan


def kernel_segment_length(batch: int, channels: int, state: int, length: int) -> int:
    """Longest run of tokens one stock selective-scan call handles correctly (`length` if all fit)."""
    by_strides = UINT32_MAX // (batch * max(channels, state))
    by_chunk_states = INT32_MAX // (batch * channels * state) * KERNEL_CHUNK
    longest = min(INT32_MAX, by_strides, by_chunk_states)
    if longest >= length:
        return length
    if longest < KERNEL_CHUNK:
        raise RuntimeError(f"selective_scan: batch {batch} x channels {channels} x d_state {state} is past "
                           f"mamba_ssm's 32-bit offsets even for {KERNEL_CHUNK} tokens; split the batch or "
                           "pass backend='reference'")
    return longest // KERNEL_CHUNK * KERNEL_CHUNK


def scan_in_segments(kernel, segment: int, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                     delta_softplus=False, return_last_state=False):
    """Selective scan as consecutive kernel calls of at most `segment` tokens, exact.

    kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> y scans one segment from a zero
    state. Since h is linear in its initial state, the true output of a segment that starts from the
    carried state h is y + C_t . (exp(A sum_{s<=t} delta_s) * h) * silu(z_t), and the state it passes
    on is the segment's own final state plus the decayed h. Both corrections are computed with the
    reference math (differentiable, chunked): the stock kernel neither takes an initial state nor
    propagates gradients through its last state."""
    length = u.shape[-1]
    ys, h = [], None
    for start in range(0, length, segment):
        part = slice(start, start + segment)
        # contiguous copies: the kernel indexes with the tensor's own (full-length) batch stride
        u_s, delta_s, B_s, C_s = (t[..., part].contiguous() for t in (u, delta, B, C))
        z_s = None if z is None else z[..., part].contiguous()
        y = kernel(u_s, delta_s, A, B_s, C_s, D, z_s, delta_bias, delta_softplus)
        is_last = start + segment >= length
        if h is None and is_last and not return_last_state:
            ys.append(y)
            continue
        dtype = compute_dtype(u.dtype)
        with torch.autocast(device_type=u.device.type, enabled=False):
            delta_eff = effective_delta(delta_s, delta_bias, delta_softplus, dtype)
            if h is not None:
                extra = initial_state_readout(delta_eff, A.to(dtype), C_s.to(dtype), h)
                if z_s is not None:
                    extra = extra * F.silu(z_s.to(dtype))
                y = y + extra.to(y.dtype)
            if not is_last or return_last_state:
                h = final_state(delta_eff, delta_eff * u_s.to(dtype), A.to(dtype), B_s.to(dtype), h)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    return (y, h) if return_last_state else y


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. The stock kernel's backward checks only
    dout's last stride and loads rows 16 bytes at a time, so a gradient that is a slice of a longer
    tensor (torch.cat of segments, a transposed view) has misaligned rows: 'CUDA error: misaligned
    address' on the device."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _stock_kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    fn, reason = _import_selective_scan()
    if fn is None:
        raise RuntimeError(f"selective_scan: backend 'cuda' needs mamba_ssm ({reason}); {INSTALL_HINT}")
    dtype = u.dtype  # the kernel wants delta, B, C, z in u's dtype and A, D, delta_bias in fp32
    y = fn(u, delta.to(dtype), A.float(), B.to(dtype), C.to(dtype), None if D is None else D.float(),
           None if z is None else z.to(dtype), None if delta_bias is None else delta_bias.float(),
           delta_softplus)
    return _ContiguousGrad.apply(y)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """The "cuda" backend: mamba_ssm's selective_scan_fn, split along L where its limits require."""
    batch, channels, length = u.shape
    segment = kernel_segment_length(batch, channels, A.shape[1], length)
    return scan_in_segments(_stock_kernel, segment, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state)


def supports_cuda(info: ScanInfo) -> bool:
    return (info.device.type == "cuda" and info.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and info.state <= 256 and scan_kernel_available())  # the kernel's d_state limit


# ---------------------------------------------------------------------------------------------------
# Causal depthwise conv1d + SiLU (Mamba's short convolution)


def conv_segment_length(batch: int, channels: int, length: int, width: int) -> int:
    longest = min(INT32_MAX, UINT32_MAX // (batch * channels)) - (width - 1)  # L is an int too
    if longest >= length:
        return length
    if longest < 1:
        raise RuntimeError(f"causal_conv1d: batch {batch} x channels {channels} is past its 32-bit "
                           "offsets; split the batch")
    return longest


def causal_conv1d_silu(x, weight, bias=None):
    """silu(causal depthwise conv1d): x (batch, E, L), weight (E, 1, width) as nn.Conv1d's, bias (E,).

    On CUDA: our kernel when registered (methods.ssm.backends_gpu; fast at any shape), else
    causal_conv1d's kernel when installed (split along L past its limits, each segment with the
    width - 1 tokens before it as context, so exact); F.conv1d elsewhere."""
    y = backends_gpu.fast_conv(x, weight, bias)
    if y is not None:
        return y
    width = weight.shape[-1]
    fn = _import_causal_conv1d()[0] if x.is_cuda else None
    if fn is None:
        return F.silu(F.conv1d(F.pad(x, (width - 1, 0)), weight, bias, groups=x.shape[1]))
    batch, channels, length = x.shape
    segment = conv_segment_length(batch, channels, length, width)
    weight2d = weight.squeeze(1)
    outs = []
    for start in range(0, length, segment):
        lo = max(0, start - (width - 1))
        part = x[..., lo:start + segment].contiguous()  # contiguous along L, the layout the kernel wants
        # the kernel's backward loads rows 16 bytes at a time: hand it a contiguous gradient, not a
        # slice of the concatenated segments' gradient (misaligned rows)
        outs.append(_ContiguousGrad.apply(fn(part, weight2d, bias, activation="silu"))[..., start - lo:])
    return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
