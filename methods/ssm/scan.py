"""Selective scan (Mamba-1's S6 recurrence) with mamba_ssm's `selective_scan_fn` semantics.

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t u_t B_t          h: (batch, E, N), h_{-1} = 0
    y_t    = (C_t . h_t + D u_t) * silu(z_t)                        (D and z optional)

Shapes: u, delta, z (batch, E, L); A (E, N) real; B, C (batch, N, L); D, delta_bias (E,).

Backends: "reference" is our PyTorch implementation (any device, autograd, memory O(L x E) plus one
chunk's states); "cuda" is mamba_ssm's kernel (registered in methods/ssm/__init__.py, see cuda.py);
others (the gpu helper's Triton scan) come through `register_backend`. "auto" takes the available
backend of highest priority that supports the call.

Why hand-written: mamba_ssm cannot be imported without its CUDA extension and its own reference
materialises the (batch, E, L, N) tensor, i.e. 6.4 GB for one 10^6-token layer of 100 channels.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Elements of one chunk's (batch, E, T, N) tensors; sets the chunk length T (see `_chunk_length`).
# 2^19 fp32 elements = 2 MiB per tensor: big enough that Python overhead per chunk is small for narrow
# layers (E = 6: T = 4096), small enough that one chunk's autograd graph stays in tens of MiB.
CHUNK_ELEMENTS = 2**19
MIN_CHUNK, MAX_CHUNK = 16, 8192


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ScanInfo:
    """What a backend's `supports` sees about one call."""

    batch: int
    channels: int  # E
    state: int  # N
    length: int  # L
    device: torch.device
    dtype: torch.dtype
    needs_grad: bool
    return_last_state: bool


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> ScanInfo:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, E, L), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError("selective_scan: the sequence is empty (L = 0); give at least one token")
    if A.dim() != 2 or A.shape[0] != channels or A.is_complex():
        raise ValueError(f"selective_scan: A must be real (E, N) with E={channels}, got "
                         f"{tuple(A.shape)} {A.dtype}")
    state = A.shape[1]
    expected = {"delta": (delta, (batch, channels, length)), "B": (B, (batch, state, length)),
                "C": (C, (batch, state, length)), "D": (D, (channels,)), "z": (z, (batch, channels, length)),
                "delta_bias": (delta_bias, (channels,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape} (u is {tuple(u.shape)}, "
                             f"A is {tuple(A.shape)}), got {tuple(tensor.shape)}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError("selective_scan: all inputs must be on the same device; move them with .to(device)")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return ScanInfo(batch, channels, state, length, u.device, u.dtype, needs_grad, False)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Like the kernel: states in fp32 for fp16/bf16/fp32 inputs; fp64 kept (the test oracle).
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_delta(delta, delta_bias=None, delta_softplus=False, dtype=torch.float32):
    """delta' = softplus(delta + delta_bias) in `dtype` (softplus linear above 20, as the kernel)."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


# ---------------------------------------------------------------------------------------------------
# Naive oracle


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential loop over time: the test oracle. Computes in float64 when u is float64 (else fp32),
    returns y in u's dtype. Memory and time O(L) Python steps: for short sequences only."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u.dtype)
    u_, A_, B_, C_ = u.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    delta_ = effective_delta(delta, delta_bias, delta_softplus, dtype)
    h = u_.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        impulse = (delta_[:, :, t] * u_[:, :, t])[..., None] * B_[:, None, :, t]
        h = torch.exp(delta_[:, :, t, None] * A_) * h + impulse
        ys.append((h * C_[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u_
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------------
# Chunked reference: the building blocks (also used by cuda.py to join kernel segments)


def _chunk_length(batch: int, channels: int, state: int) -> int:
    """Chunk length T: a power of two so that one chunk's (batch, E, T, N) tensors stay ~CHUNK_ELEMENTS."""
    t = CHUNK_ELEMENTS // max(1, batch * channels * state)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, 2 ** int(math.log2(max(t, 1))))))


def _decay(exponent):
    """exp(exponent), with factors below sqrt(smallest normal) (e^-43 in fp32) set to exactly 0.

    Products of two such factors would otherwise reach the subnormal range, where CPU arithmetic is
    about 100x slower; the terms dropped are smaller than e^-43 = 1e-19 of what they decay from."""
    return torch.exp(F.threshold(exponent, _log_floor(exponent.dtype), -math.inf))


def _log_floor(dtype):
    return math.log(torch.finfo(dtype).tiny) / 2


def _linear_scan(a, b, reverse=False):
    """Solutions of h_t = a_t h_{t-1} + b_t along dim 2 with h_{-1} = 0 (reverse: h_t = a_t h_{t+1} + b_t
    with h_T = 0); a, b: (batch, E, T, N).

    Work-efficient parallel scan by pairwise reduction: fold neighbours (2i, 2i+1) into one step, solve
    the half-length recurrence recursively (giving h at the second of each pair in scan direction), then
    fill in the first of each pair. 2 log2(T) levels of whole-tensor ops and O(T) work instead of T
    Python steps; stable for |a| <= 1 since it only multiplies a's together."""
    length = a.shape[2]
    if length == 1:
        return b
    if length % 2:  # an identity step (a = 1, b = 0) at the end makes the length even
        padded = _linear_scan(F.pad(a, (0, 0, 0, 1), value=1.0), F.pad(b, (0, 0, 0, 1)), reverse)
        return padded[:, :, :length]
    a_even, a_odd = a.unflatten(2, (length // 2, 2)).unbind(3)
    b_even, b_odd = b.unflatten(2, (length // 2, 2)).unbind(3)
    pair = F.threshold(a_odd * a_even, math.exp(_log_floor(a.dtype)), 0.0)  # see _decay
    h = torch.empty_like(b)  # results are written straight into its even / odd views
    h_even, h_odd = h.unflatten(2, (length // 2, 2)).unbind(3)
    if not reverse:  # pairs (2i, 2i+1) -> h at odd t, then h_2i = a_2i h_2i-1 + b_2i
        h_odd.copy_(_linear_scan(pair, torch.addcmul(b_odd, a_odd, b_even)))
        h_even[:, :, :1] = b_even[:, :, :1]
        torch.addcmul(b_even[:, :, 1:], a_even[:, :, 1:], h_odd[:, :, :-1], out=h_even[:, :, 1:])
    else:  # h at even t, then h_2i+1 = a_2i+1 h_2i+2 + b_2i+1
        h_even.copy_(_linear_scan(pair, torch.addcmul(b_even, a_even, b_odd), reverse=True))
        h_odd[:, :, -1:] = b_odd[:, :, -1:]
        torch.addcmul(b_odd[:, :, :-1], a_odd[:, :, :-1], h_even[:, :, 1:], out=h_odd[:, :, :-1])
    return h


def _per_token(x):
    """(batch, N, T) -> (batch, 1, T, N), contiguous: broadcasting a transposed view against
    (batch, E, T, N) tensors, or contracting with einsum, is several times slower on CPU."""
    return x.transpose(1, 2).unsqueeze(1).contiguous()


def _contract_state(x, per_token):
    # sum_n x[b, e, t, n] * per_token[b, 0, t, n] -> (batch, E, T), as a product and a mat-vec.
    return (x * per_token) @ x.new_ones(x.shape[-1])


def _chunk_states(delta, du, A, B_t, h0):
    """States h_t of one chunk from h0, and the decays a_t = exp(delta_t A): both (batch, E, T, N).

    delta, du = delta * u: (batch, E, T); B_t: (batch, 1, T, N); h0: (batch, E, N). No autograd: runs
    inside _ChunkedScan, which is why the in-place updates of fresh tensors here and below are safe."""
    decay = _decay(delta.unsqueeze(-1) * A.unsqueeze(1))
    impulse = du.unsqueeze(-1) * B_t
    impulse[:, :, 0] += decay[:, :, 0] * h0  # h0 enters through the first step: h_0 = a_0 h0 + b_0
    return _linear_scan(decay, impulse), decay


def _chunk_forward(delta, du, A, B, C, h0):
    h, _ = _chunk_states(delta, du, A, _per_token(B), h0)
    return _contract_state(h, _per_token(C)), h[:, :, -1]


def _chunk_backward(delta, du, A, B, C, h0, dy, dh_last):
    """Gradients of one chunk given those of its outputs y and last state (the adjoint recurrence).

    g_t = dLoss/dh_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1}: the same linear scan run backwards in time."""
    B_t, C_t = _per_token(B), _per_token(C)
    h, decay = _chunk_states(delta, du, A, B_t, h0)
    direct = dy.unsqueeze(-1) * C_t
    direct[:, :, -1] += dh_last
    next_decay = F.pad(decay[:, :, 1:], (0, 0, 0, 1), value=1.0)  # a_{t+1}; the last one meets g_T = 0
    g = _linear_scan(next_decay, direct, reverse=True)
    g_exponent = g * decay  # times h_{t-1}: dLoss/d(delta_t A) per element
    g_exponent[:, :, 1:] *= h[:, :, :-1]
    g_exponent[:, :, 0] *= h0
    return (torch.einsum("betn,en->bet", g_exponent, A),  # delta
            _contract_state(g, B_t),  # du
            (delta.unsqueeze(2) @ g_exponent).sum(0).squeeze(1),  # A
            (g * du.unsqueeze(-1)).sum(1).transpose(1, 2),  # B
            (h * dy.unsqueeze(-1)).sum(1).transpose(1, 2),  # C
            decay[:, :, 0] * g[:, :, 0])  # h0


class _ChunkedScan(torch.autograd.Function):
    """Forward chunk by chunk, keeping only the inputs and each chunk's starting state; backward
    recomputes one chunk at a time, from the last chunk to the first, with the adjoint scan.

    Hand-written rather than torch.utils.checkpoint around autograd: faster on CPU, and nothing of
    size L x E x N is ever held."""

    @staticmethod
    def forward(ctx, delta, du, A, B, C, h0, chunk):
        ys, starts, h = [], [], h0
        for begin in range(0, delta.shape[-1], chunk):
            part = slice(begin, begin + chunk)
            starts.append(h)
            y, h = _chunk_forward(delta[..., part], du[..., part], A, B[..., part], C[..., part], h)
            ys.append(y)
        ctx.chunk = chunk
        ctx.save_for_backward(delta, du, A, B, C, torch.stack(starts, dim=2))
        return torch.cat(ys, dim=-1), h

    @staticmethod
    def backward(ctx, dy, dh):
        delta, du, A, B, C, starts = ctx.saved_tensors
        chunk, length = ctx.chunk, delta.shape[-1]
        grads = {name: [] for name in ("delta", "du", "B", "C")}
        dA = torch.zeros_like(A)
        for index in reversed(range(starts.shape[2])):
            part = slice(index * chunk, min(length, (index + 1) * chunk))
            d_delta, d_du, d_A, d_B, d_C, dh = _chunk_backward(
                delta[..., part], du[..., part], A, B[..., part], C[..., part], starts[:, :, index],
                dy[..., part], dh)
            for name, grad in zip(grads, (d_delta, d_du, d_B, d_C)):
                grads[name].append(grad)
            dA += d_A
        full = {name: torch.cat(parts[::-1], dim=-1) for name, parts in grads.items()}
        return full["delta"], full["du"], dA, full["B"], full["C"], dh, None


def chunked_scan(delta, du, A, B, C, chunk=None):
    """States of h_t = exp(delta_t A) h_{t-1} + du_t B_t from a zero state, chunk by chunk.

    Returns (y_ssm, h_last): y_ssm_t = C_t . h_t, (batch, E, L), and the last state (batch, E, N).
    delta is the effective (post-softplus) step, du = delta * u; all in one dtype; L >= 1."""
    batch, channels, length = delta.shape
    chunk = chunk or _chunk_length(batch, channels, A.shape[1])
    return _ChunkedScan.apply(delta, du, A, B, C, delta.new_zeros(batch, channels, A.shape[1]), chunk)


def _run_chunks(fn, needs_grad: bool, *args):
    # Checkpointing makes backward recompute one chunk at a time: only each chunk's inputs and its
    # boundary state are kept, never the chunk's (batch, E, T, N) tensors.
    if needs_grad:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _readout_chunk(delta, A, C, h0):
    decay = _decay(torch.cumsum(delta, dim=-1).unsqueeze(-1) * A.unsqueeze(1))  # (batch, E, T, N)
    y = torch.einsum("betn,ben,bnt->bet", decay, h0, C)
    return y, decay[:, :, -1] * h0


def initial_state_readout(delta, A, C, h0, chunk=None):
    """What an initial state h0 adds to the outputs: C_t . (exp(A sum_{s<=t} delta_s) * h0), (batch, E, L).

    Stops as soon as the decayed state is zero (every factor below e^-43, see `_decay`): every later
    term is then zero too, so this usually costs a short prefix of the sequence. Differentiable."""
    batch, channels, length = delta.shape
    chunk = chunk or _chunk_length(batch, channels, A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (delta, A, C, h0))
    ys, h, done = [], h0, 0
    while done < length and bool(h.any()):
        part = slice(done, done + chunk)
        y, h = _run_chunks(_readout_chunk, needs_grad, delta[..., part], A, C[..., part], h)
        ys.append(y)
        done += y.shape[-1]
    if done < length:
        ys.append(delta.new_zeros(batch, channels, length - done))
    return torch.cat(ys, dim=-1)


def _final_chunk(delta, du, A, B, to_end):
    # Contribution of this chunk's tokens to the final state, and the decay from the chunk start to the end.
    after = torch.flip(torch.cumsum(torch.flip(delta, [-1]), dim=-1), [-1]) - delta  # sum over s > t in chunk
    weight = to_end.unsqueeze(2) * _decay(after.unsqueeze(-1) * A.unsqueeze(1))  # (batch, E, T, N)
    contribution = torch.einsum("betn,bet,bnt->ben", weight, du, B)
    return contribution, to_end * _decay(delta.sum(-1, keepdim=True) * A)


def final_state(delta, du, A, B, h0=None, chunk=None):
    """Last state of the recurrence, sum_t exp(A sum_{s>t} delta_s) du_t B_t (+ the decayed h0).

    Walks back from the end and stops once the decay to the end is zero (see `_decay`). Differentiable."""
    batch, channels, length = delta.shape
    chunk = chunk or _chunk_length(batch, channels, A.shape[1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (delta, du, A, B, h0))
    to_end = delta.new_ones(batch, channels, A.shape[1])
    h = delta.new_zeros(batch, channels, A.shape[1])
    end = length
    while end > 0 and bool(to_end.any()):
        part = slice(max(0, end - chunk), end)
        contribution, to_end = _run_chunks(_final_chunk, needs_grad, delta[..., part], du[..., part], A,
                                           B[..., part], to_end)
        h = h + contribution
        end = part.start
    if h0 is not None and end == 0:
        h = h + to_end * h0
    return h


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, chunk=None):
    """The "reference" backend: chunked parallel scan; backward recomputes one chunk at a time."""
    dtype = compute_dtype(u.dtype)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_ = u.to(dtype)
        delta_ = effective_delta(delta, delta_bias, delta_softplus, dtype)
        y, h = chunked_scan(delta_, delta_ * u_, A.to(dtype), B.to(dtype), C.to(dtype), chunk=chunk)
        if D is not None:
            y = y + D.to(dtype)[:, None] * u_
        if z is not None:
            y = y * F.silu(z.to(dtype))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[[ScanInfo], bool]
    priority: int


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, supports: Callable[[ScanInfo], bool], priority: int) -> None:
    """Add (or replace) a scan backend.

    fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) follows `selective_scan`;
    supports(ScanInfo) says whether it can run a call (device, shape, availability of its kernels);
    "auto" picks the supporting backend of highest priority (reference 0, mamba_ssm's cuda 10)."""
    if name == "auto":
        raise ValueError("register_backend: 'auto' is reserved; choose another backend name")
    _BACKENDS[name] = Backend(name, fn, supports, priority)


def available_backends() -> list[str]:
    return sorted(_BACKENDS, key=lambda n: -_BACKENDS[n].priority)


def _pick_backend(name: str, info: ScanInfo) -> Backend:
    if name == "auto":
        candidates = sorted(_BACKENDS.values(), key=lambda b: -b.priority)
        chosen = next(b for b in candidates if b.supports(info))
        if info.device.type == "cuda" and chosen.name == "reference":
            warnings.warn("selective_scan: no CUDA scan kernel available (install the `gpu` extra: "
                          "mamba-ssm, causal-conv1d); running the PyTorch reference scan on the GPU",
                          stacklevel=3)
        return chosen
    if name not in _BACKENDS:
        raise ValueError(f"selective_scan: unknown backend '{name}'; choose one of "
                         f"{['auto', *available_backends()]}")
    backend = _BACKENDS[name]
    if not backend.supports(info):
        raise RuntimeError(f"selective_scan: backend '{name}' cannot run this call ({info.batch}x"
                           f"{info.channels}x{info.length} on {info.device}); use backend='auto'")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto"):
    """mamba_ssm.selective_scan_fn semantics; returns y (batch, E, L) [, last_state (batch, E, N)].

    backend: "auto" | "reference" | "cuda" | any name given to `register_backend`. Unlike the stock
    kernel, the reference backend propagates gradients through last_state."""
    info = replace(_check_inputs(u, delta, A, B, C, D, z, delta_bias), return_last_state=return_last_state)
    chosen = _pick_backend(backend, info)
    return chosen.fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


register_backend("reference", reference_scan, lambda info: True, priority=0)
