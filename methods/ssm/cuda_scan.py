"""Sequence-parallel selective scan in CUDA (methods/ssm/csrc/scan_sp.cu), for d_state 16.

The same passes as the Triton scan (methods/ssm/triton_scan.py, kept beside it as the reference and as
the fallback), with a channel's states in two lanes' registers instead of spread over a warp. Timings:
docs/performance.md, sessions 5-10.

The extension (the scan, and the mixer's convolution and small projections of csrc/channel_ops.cu,
see methods/ssm/cuda_channel.py) is compiled with torch.utils.cpp_extension on first use (about 90 s,
then cached in torch's extension directory, $TORCH_EXTENSIONS_DIR). Without nvcc, or with
WSI_BENCH_CUDA_SCAN=0, the Triton kernels run instead. "auto" picks the scan where it was measured
faster: inference up to 768 channels, training up to 48 (methods/ssm/backends_gpu.py,
`cuda_sp_supports`); backend="cuda_sp" asks for it anywhere, gradients included.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from methods.ssm.triton_scan import _check_inputs, scan_outputs

SOURCE = Path(__file__).with_name("csrc") / "scan_sp.cu"
# one extension: the scan, the channel ops (methods/ssm/cuda_channel.py) and their Python bindings
SOURCES = (SOURCE, SOURCE.with_name("channel_ops.cu"), SOURCE.with_name("bindings.cpp"))
STATES = 16          # the kernel's d_state
THREADS = {12: 96, 16: 128, 24: 96, 32: 128}  # per block, by group; a block holds THREADS / group segments
KERNELS = ("fwd_summary", "fwd_out", "bwd_summary", "bwd_main")
CHUNK = 8            # tokens per vector load
PAIR = 16            # segments are whole multiples of 16 tokens (dB | dC are written 16 at a time)
TARGET_BLOCKS = 8192  # enough blocks to fill 132 multiprocessors many times over
MIN_SEGMENT = 64      # shorter segments spend more on summaries than on scanning
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension, or None (with one warning saying why) where it cannot be built."""
    if os.environ.get("WSI_BENCH_CUDA_SCAN", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        print("[wsi-bench] loading the CUDA selective scan and channel ops (the first time on a machine "
              "it compiles: about two minutes)", file=sys.stderr, flush=True)
        return load(name="wsi_bench_ssm_ops", sources=[str(s) for s in SOURCES], extra_cuda_cflags=["-O3"],
                    verbose=False)
    except Exception as err:  # no nvcc, a compiler error: the Triton kernels run instead
        warnings.warn(f"the CUDA selective scan did not build ({type(err).__name__}: {err}); using the "
                      "Triton kernels. Install the CUDA toolkit (nvcc) to build it, or set "
                      "WSI_BENCH_CUDA_SCAN=0 to skip it", RuntimeWarning, stacklevel=2)
        return None


def groups(channels: int) -> dict[str, int]:
    """Lanes per segment (two per channel slot) of each pass, as measured fastest on the H200
    (docs/performance.md, session 9). Groups of 12 and 24 lanes leave no lane idle at Pixel-Mamba's
    widths (3 x 2^k channels), but those groups span warps and wait at block barriers. At 6 channels
    that costs fwd_out and bwd_main more than the idle lanes of a group of 16 do; at 12 and 24 channels
    group 24 wins every pass (at 24 the scan's fwd + bwd 14.6 -> 9.1 ms); from 48 channels the forward
    passes are faster in group 32 and bwd_main in group 24 (7.7 -> 5.4 ms at 48: group 32 sums 16 channel
    slots per token). Every pass of a scan holds the same number of segments per block (the passes
    share their summaries)."""
    if channels <= 6:
        return dict(fwd_summary=12, fwd_out=16, bwd_summary=12, bwd_main=16)
    if channels <= 8:
        return dict.fromkeys(KERNELS, 16)
    if channels <= 12 or 16 < channels <= 24:
        return dict.fromkeys(KERNELS, 24)
    return dict(fwd_summary=32, fwd_out=32, bwd_summary=32, bwd_main=32 if channels <= 16 else 24)


@dataclass(frozen=True)
class Geometry:
    batch: int
    channels: int
    length: int
    groups: dict   # lanes per segment of each pass (`groups`)
    seg_len: int
    n_seg: int
    n_sup: int     # superblocks (blocks along the sequence)
    n_cblk: int    # blocks along the channels, in bwd_main (more than one: dB | dC add atomically)


def plan(batch: int, channels: int, length: int) -> Geometry:
    by_pass = groups(channels)
    per_block = {THREADS[g] // g for g in by_pass.values()}
    assert len(per_block) == 1, f"the passes' groups {by_pass} hold different numbers of segments per block"
    per_block = per_block.pop()
    n_cblk = triton.cdiv(channels, by_pass["bwd_main"] // 2)
    segments_wanted = max(1, TARGET_BLOCKS * per_block // (batch * n_cblk))
    seg_len = triton.cdiv(max(MIN_SEGMENT, triton.cdiv(length, segments_wanted)), PAIR) * PAIR
    n_seg = triton.cdiv(length, seg_len)
    return Geometry(batch, channels, length, by_pass, seg_len, n_seg, triton.cdiv(n_seg, per_block), n_cblk)


def _run(kernel: str, geo: Geometry, tensors: dict, softplus: bool, atomic_bc: bool = False) -> None:
    sizes = dict(group=geo.groups[kernel], seg_len=geo.seg_len, n_seg=geo.n_seg, n_sup=geo.n_sup,
                 softplus=int(softplus), atomic_bc=int(atomic_bc))
    extension().run(kernel, tensors, sizes)


def _carry(summary, dtsum, A, geo: Geometry, reverse: bool):
    rows = geo.batch * geo.channels
    carry = torch.empty(rows, geo.n_sup + 1, STATES, device=summary.device, dtype=torch.float32)
    extension().carry(summary, dtsum, A, carry, reverse)
    return carry


def _token_major(x):
    """x with token stride 1 (the kernel's vector loads walk tokens)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _given(**tensors):
    return {name: t for name, t in tensors.items() if t is not None}


@dataclass
class Saved:
    """What the backward needs from the forward: tensors (for ctx.save_for_backward) and the plan."""
    tensors: tuple
    geo: Geometry
    softplus: bool
    dtypes: list  # the inputs' dtypes, for their gradients


def scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """(out, last_state, saved) of the scan; `scan_backward(saved, dout)` gives the gradients."""
    batch, channels, length, _ = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    # gradients go back in each input's dtype; the kernel reads u's dtype throughout
    dtypes = [None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias)]
    dtype = u.dtype
    delta, B, C, z = (None if x is None else _token_major(x.to(dtype)) for x in (delta, B, C, z))
    u = _token_major(u)
    A32, D32, bias32 = (None if x is None else x.float().contiguous() for x in (A, D, delta_bias))
    if extension() is None:
        raise RuntimeError("the CUDA selective scan is not built here (see the warning above); use "
                           "backend='auto', which falls back to the Triton scan")
    geo = plan(batch, channels, length)
    rows, f32 = batch * channels, dict(device=u.device, dtype=torch.float32)
    inputs = _given(u=u, delta=delta, A=A32, B=B, C=C, D=D32, z=z, bias=bias32)
    hseg, dtseg = torch.empty(rows, geo.n_seg, STATES, **f32), torch.empty(rows, geo.n_seg, **f32)
    sup_h, sup_dt = torch.empty(rows, geo.n_sup, STATES, **f32), torch.empty(rows, geo.n_sup, **f32)
    _run("fwd_summary", geo, {**inputs, "hseg": hseg, "dtseg": dtseg, "sup_h": sup_h, "sup_dt": sup_dt},
         delta_softplus)
    carry = _carry(sup_h, sup_dt, A32, geo, reverse=False)
    out = torch.empty(u.shape, device=u.device, dtype=dtype)
    hstart = torch.empty(rows, geo.n_seg, STATES, **f32)
    _run("fwd_out", geo, {**inputs, "hseg": hseg, "dtseg": dtseg, "carry": carry, "hstart": hstart,
                          "out": out}, delta_softplus)
    saved = Saved((u, delta, A32, B, C, D32, z, bias32, hstart, dtseg, sup_dt), geo, delta_softplus, dtypes)
    return out, carry[:, geo.n_sup].view(batch, channels, STATES), saved


def _whole_rows(x, shape, dtype) -> bool:
    """Whether the kernel can write a gradient of `shape` into x: rows of L tokens one after the other."""
    return (x is not None and tuple(x.shape) == tuple(shape) and x.dtype == dtype and x.stride(2) == 1
            and x.stride(1) == shape[2] and (shape[0] == 1 or x.stride(0) == shape[1] * shape[2]))


def scan_backward(saved: Saved, dout, ddelta=None, dBC=None, dz=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) of `scan_forward` at dout, None for
    inputs not given. ddelta, dBC ((batch, 2 x 16, L): dB above dC) and dz may be buffers to write into
    (slices of whole rows, e.g. of the mixer's fused gradient); where the kernel cannot write one
    directly the values are copied into it."""
    u, delta, A, B, C, D, z, bias, hstart, dtseg, sup_dt = saved.tensors
    geo = saved.geo
    rows, f32 = geo.batch * geo.channels, dict(device=u.device, dtype=torch.float32)
    inputs = _given(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, bias=bias,
                    dout=_token_major(dout.to(u.dtype)), hstart=hstart, dtseg=dtseg)
    hck = torch.empty(rows, triton.cdiv(geo.length, CHUNK), STATES, **f32)
    wseg = torch.empty(rows, geo.n_seg, STATES, **f32)
    wsup = torch.empty(rows, geo.n_sup, STATES, **f32)
    _run("bwd_summary", geo, {**inputs, "hck": hck, "wseg": wseg, "wsup": wsup}, saved.softplus)
    rcarry = _carry(wsup, sup_dt, A, geo, reverse=True)
    same = dict(device=u.device, dtype=u.dtype)

    def into(given, shape):  # given where the kernel can write it, else a new buffer copied into it after
        return given if _whole_rows(given, shape, u.dtype) else torch.empty(shape, **same)

    # dB | dC in one (batch, 32, L) buffer; several channel blocks add into it in float32
    atomic = geo.n_cblk > 1
    bc_shape = (geo.batch, 2 * STATES, geo.length)
    dbc = torch.zeros(bc_shape, **f32) if atomic else into(dBC, bc_shape)
    parts = geo.batch * geo.n_sup
    grads = dict(du=torch.empty(u.shape, **same), ddelta=into(ddelta, u.shape),
                 dz=None if z is None else into(dz, u.shape), dBC=dbc,
                 dA_part=torch.empty(parts, geo.channels, STATES, **f32),
                 dD_part=torch.empty(parts, geo.channels, **f32),
                 dbias_part=torch.empty(parts, geo.channels, **f32))
    _run("bwd_main", geo, {**inputs, **_given(**grads), "wseg": wseg, "hck": hck, "rcarry": rcarry},
         saved.softplus, atomic)
    for given, made in ((ddelta, grads["ddelta"]), (dz, grads["dz"]), (dBC, dbc)):
        if given is not None and made is not None and given is not made:
            given.copy_(made)
    u_t, delta_t, A_t, B_t, C_t, D_t, z_t, bias_t = saved.dtypes
    return (grads["du"].to(u_t), grads["ddelta"].to(delta_t), grads["dA_part"].sum(0).to(A_t),
            dbc[:, :STATES].to(B_t), dbc[:, STATES:].to(C_t),
            None if D is None else grads["dD_part"].sum(0).to(D_t),
            None if z is None else grads["dz"].to(z_t),
            None if bias is None else grads["dbias_part"].sum(0).to(bias_t))


class CudaSelectiveScan(torch.autograd.Function):
    """mamba_ssm.selective_scan_fn's semantics, sequence-parallel. The last state gets no gradient
    (as in mamba-ssm)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
        out, last_state, saved = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(*saved.tensors)
        saved.tensors = None
        ctx.saved = saved
        return scan_outputs(ctx, out, last_state, return_last_state)

    @staticmethod
    def backward(ctx, dout, *unused):
        ctx.saved.tensors = ctx.saved_tensors
        return (*scan_backward(ctx.saved, dout), None, None)


def supports(channels: int, state: int, dtype: torch.dtype) -> bool:
    """Whether the CUDA scan can run the call (its extension built, d_state 16, float32 or bfloat16)."""
    return state == STATES and dtype in DTYPES and channels >= 1 and extension() is not None


def selective_scan_cuda_sp(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """Drop-in for mamba_ssm.selective_scan_fn on (batch, channels, length) CUDA tensors with
    input-dependent B, C of shape (batch, 16, length)."""
    return CudaSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
