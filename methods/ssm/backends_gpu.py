"""Registers the sequence-parallel scans as backends of `methods.ssm.scan.selective_scan`: "cuda_sp" (CUDA,
methods/ssm/cuda_scan.py, d_state 16, compiled on first use; at the shapes where it beat the Triton
scan, see `cuda_sp_supports`) and "triton" (methods/ssm/triton_scan.py, any d_state, the other
shapes, and the fallback where the CUDA one does not build), and says by shape where they beat
mamba-ssm's stock kernel; switches Mamba's short convolution to our kernels on CUDA
(methods/ssm/cuda_channel.py, else methods/ssm/triton_conv.py), and the narrow mixers' projections to
our token-wise linear maps (the same two modules, triton_linear.py).

    from methods.ssm import backends_gpu
    backends_gpu.register()          # idempotent; a no-op without CUDA or Triton
    with backends_gpu.triton_disabled():   # the stock kernels (mamba-ssm, causal-conv1d): benchmarks
        ...
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch

from methods.ssm.scan import ScanInfo, register_backend

# Above mamba-ssm's "cuda" backend (10): "auto" asks these first, and their `supports` sends the
# shapes where the stock kernel is as fast back to it.
TRITON_PRIORITY = 20
CUDA_SP_PRIORITY = 30
CUDA_SP_MAX_CHANNELS = 768        # inference; measured, see `cuda_sp_supports`
CUDA_SP_MAX_TRAIN_CHANNELS = 48   # training; measured, see `cuda_sp_supports`
TRITON_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes its tests cover
MAX_STATE = 64
# The stock kernel runs one thread block per (batch, channel) and walks the sequence serially, so its
# time is ~ L x ceil(batch * E / 132 multiprocessors); the split scan's time is ~ batch * E * L. On an
# H100 (docs/performance.md) ours was faster at every Pixel-Mamba layer of a 16 M-pixel image, from
# 32x at 6 channels x 16.8 M tokens to 1.1-1.3x at 384-1536 channels x 4-10 k tokens (fwd+bwd, bf16).
# Past ~2048 rows the stock kernel fills the GPU by itself; below 4096 tokens the split scan has too
# few segments to fill it and both take well under a millisecond.
STOCK_WINS_FROM_ROWS = 2048
MIN_LENGTH = 4096


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def triton_supports(info: ScanInfo) -> bool:
    """True where the Triton scan can run the call and is expected to beat the stock kernel."""
    return (info.device.type == "cuda" and info.dtype in TRITON_DTYPES and info.state <= MAX_STATE
            and info.batch * info.channels < STOCK_WINS_FROM_ROWS and info.length >= MIN_LENGTH)


def triton_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    from methods.ssm.triton_scan import selective_scan_triton  # imports triton: only when used

    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def cuda_sp_supports(info: ScanInfo) -> bool:
    """Calls where the Triton scan would run, the CUDA scan can (it builds, d_state 16), and it was the
    faster of the two at every Pixel-Mamba layer shape of 16 M tissue pixels (H200, docs/performance.md,
    sessions 6, 7 and 9).

    Forward: faster up to 768 channels (6 x 16.8 M in bf16: 2.95 against 3.78 ms), not at 1536.
    Forward + backward, the whole bf16 mixer: faster at 6 channels (31.5 against 40.0 ms, session 7),
    at 12 (34.4-35.2 against 37.2 ms) and, since lane groups of 24 (session 9), at 24 (24.2 against
    27.2 ms; with groups of 32 it was 35.2) and 48 (23.3 against 29.6 ms); 96 and more were not
    measured. Above 12 channels a block holds only some of them and adds its share of dB | dC
    atomically into a float32 buffer."""
    most = CUDA_SP_MAX_TRAIN_CHANNELS if info.needs_grad else CUDA_SP_MAX_CHANNELS
    if info.channels > most or not triton_supports(info):
        return False
    from methods.ssm import cuda_scan  # compiles the extension on the first call

    return cuda_scan.supports(info.channels, info.state, info.dtype)


def fused_branch_supports(xz, state: int, width: int, needs_grad: bool, backend: str) -> bool:
    """Whether the mixer's fused branch (methods/ssm/fused_branch.py) can run a branch on xz
    (batch, 2E, L): `backend` would take the CUDA scan for it and the CUDA convolution runs its width
    and its batch x E rows."""
    if backend not in ("auto", "cuda_sp") or not (_kernels_enabled and xz.is_cuda):
        return False
    batch, channels, length = xz.shape[0], xz.shape[1] // 2, xz.shape[2]
    info = ScanInfo(batch, channels, state, length, xz.device, xz.dtype, needs_grad, False)
    from methods.ssm import cuda_channel, cuda_scan  # compiles the extension on the first call

    wanted = cuda_sp_supports(info) if backend == "auto" else cuda_scan.supports(channels, state, xz.dtype)
    return wanted and cuda_channel.conv_runs(batch, channels, width, xz.dtype)


def cuda_sp_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False):
    from methods.ssm.cuda_scan import selective_scan_cuda_sp

    return selective_scan_cuda_sp(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


_kernels_enabled = False  # our convolution and projections


def fast_conv(x, weight, bias=None):
    """Our short convolution where it is registered and x is on CUDA (the CUDA kernel where the
    extension builds and the width is compiled, else the Triton one), else None."""
    if not (_kernels_enabled and x.is_cuda):
        return None
    from methods.ssm.cuda_channel import causal_conv1d_silu  # imports triton: only when used

    return causal_conv1d_silu(x, weight, bias)


def channel_linear_for(x, dtype, *weight_shapes):
    """Our token-wise linear map (`cuda_channel.channel_linear`: the CUDA kernel for the shapes it is
    compiled for, the Triton one for the others) where it is registered, x is on CUDA, the matmuls run
    in a dtype where it beats cuBLAS and every (out, in) weight shape fits it, else None (use matmuls)."""
    if not (_kernels_enabled and x.is_cuda):
        return None
    from methods.ssm import cuda_channel, triton_linear  # imports triton: only when used

    if dtype in triton_linear.FAST_DTYPES and all(triton_linear.supports(n_in, n_out)
                                                   for n_out, n_in in weight_shapes):
        return cuda_channel.channel_linear
    return None


def register() -> bool:
    """Register the "cuda_sp" and "triton" scan backends, the Triton convolution and the projections'
    token-wise map where they can run; returns whether it did."""
    global _kernels_enabled
    if not triton_available():
        return False
    register_backend("cuda_sp", cuda_sp_scan, cuda_sp_supports, CUDA_SP_PRIORITY)
    register_backend("triton", triton_scan, triton_supports, TRITON_PRIORITY)
    _kernels_enabled = True
    return True


@contextmanager
def triton_disabled():
    """Inside this block "auto" never picks our scans, the convolution runs causal-conv1d's kernel and
    the projections cuBLAS (to time the stock path side by side)."""
    global _kernels_enabled
    register_backend("cuda_sp", cuda_sp_scan, lambda info: False, CUDA_SP_PRIORITY)
    register_backend("triton", triton_scan, lambda info: False, TRITON_PRIORITY)
    _kernels_enabled = False
    try:
        yield
    finally:
        register()
