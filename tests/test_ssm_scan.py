"""Selective scan: chunked reference vs the naive float64 recurrence, memory, segment joining, backends."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from methods.ssm import scan as scan_mod
from methods.ssm.cuda import (INT32_MAX, KERNEL_CHUNK, UINT32_MAX, conv_segment_length, kernel_segment_length,
                              scan_in_segments)
from methods.ssm.scan import ScanInfo, reference_scan, register_backend, selective_scan, selective_scan_ref

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, channels=3, state=5, length=37, dtype=torch.float64, seed=0, decay=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return {
        "u": r(batch, channels, length), "delta": r(batch, channels, length),
        # A spans slow and fast decay, like -exp(A_log) in a trained Mamba
        "A": -decay * torch.exp(r(channels, state)),
        "B": r(batch, state, length), "C": r(batch, state, length),
        "D": r(channels), "z": r(batch, channels, length), "delta_bias": r(channels),
    }


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scan_and_grads(fn, inputs, weights, **kw):
    """Run fn, return (y, last_state, grads of a loss touching y and the last state, per input)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = fn(**leaves, delta_softplus=True, return_last_state=True, **kw)
    ((y * weights[0]).sum() + (h * weights[1]).sum()).backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("length,chunk", [(37, 16), (50, 7), (1, 16), (16, 16)])
def test_reference_equals_naive_float64_recurrence(monkeypatch, length, chunk):
    inputs = make_inputs(length=length)
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(2, 3, length, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 5, generator=g, dtype=torch.float64))
    monkeypatch.setattr(scan_mod, "MIN_CHUNK", chunk)
    monkeypatch.setattr(scan_mod, "MAX_CHUNK", chunk)  # several chunks, the last one partial
    y, h, grads = scan_and_grads(selective_scan, inputs, weights, backend="reference")
    y_ref, h_ref, grads_ref = scan_and_grads(selective_scan_ref, inputs, weights)
    assert y.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(h, h_ref) < 1e-6
    for name in INPUT_NAMES:
        assert rel_err(grads[name], grads_ref[name]) < 1e-6, name


@pytest.mark.parametrize("decay", [1.0, 50.0])
def test_reference_float32_close_to_float64_oracle(decay):
    """decay=50 drives many decay factors and their products below e^-43, which the scan sets to 0."""
    inputs = make_inputs(length=300, decay=decay)
    y32 = reference_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True, chunk=64)
    y64 = selective_scan_ref(**inputs, delta_softplus=True)
    assert y32.dtype == torch.float32
    assert rel_err(y32.double(), y64) < 1e-5


def test_optional_inputs_absent_and_no_softplus():
    inputs = make_inputs(length=29)
    inputs["delta"] = inputs["delta"].abs()  # a positive step without softplus
    kept = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    y = reference_scan(**kept, chunk=8)
    assert rel_err(y, selective_scan_ref(**kept)) < 1e-12


def test_memory_never_holds_an_L_by_E_by_N_tensor(monkeypatch):
    """What autograd keeps for backward is O(L x (E + N)): the inputs, a few (batch, E, L) tensors and one
    state per chunk. Keeping any chunk's (batch, E, T, N) states would add up to L x E x N numbers."""
    batch, channels, state, length = 1, 16, 32, 2049
    inputs = make_inputs(batch, channels, state, length, dtype=torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    monkeypatch.setattr(scan_mod, "MAX_CHUNK", 64)
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), tuple(t.shape), t.stride())] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan(**leaves, delta_softplus=True, backend="reference")
    full = batch * channels * state * length
    assert max(saved.values()) <= full // channels  # B and C, (batch, N, L)
    assert sum(saved.values()) < full / 2
    y.sum().backward()  # and backward runs from what was kept
    assert all(v.grad is not None for v in leaves.values())


@pytest.mark.parametrize("segment,decay", [(10, 1.0), (16, 1.0), (7, 300.0)])
def test_segments_joined_by_state_correction_are_exact(segment, decay):
    """The kernel path's splitting along L, with our reference standing in for the kernel (which cannot take
    an initial state): forward, last state and all gradients equal the unsplit oracle. decay=300 makes the
    carried state vanish within a few tokens, exercising the early stop of the corrections."""
    inputs = make_inputs(length=37, decay=decay)
    g = torch.Generator().manual_seed(2)
    weights = (torch.randn(2, 3, 37, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 5, generator=g, dtype=torch.float64))

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=4)

    def split(**kw):
        return scan_in_segments(kernel, segment, **kw)

    y, h, grads = scan_and_grads(split, inputs, weights)
    y_ref, h_ref, grads_ref = scan_and_grads(selective_scan_ref, inputs, weights)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(h, h_ref) < 1e-6
    for name in INPUT_NAMES:
        assert rel_err(grads[name], grads_ref[name]) < 1e-6, name


def test_kernel_segment_length_respects_the_kernel_limits():
    assert kernel_segment_length(1, 6, 16, 10**7) == 10**7  # Pixel-Mamba's first layer fits
    shapes = [(1, 1536, 16, 3 * 10**8), (2, 6, 16, 2**31 - 1), (1, 8, 64, 10**9)]
    for batch, channels, state, length in shapes:
        seg = kernel_segment_length(batch, channels, state, length)
        assert KERNEL_CHUNK <= seg < length and seg % KERNEL_CHUNK == 0
        assert batch * max(channels, state) * seg <= UINT32_MAX
        assert batch * channels * state * -(-seg // KERNEL_CHUNK) <= INT32_MAX
    with pytest.raises(RuntimeError, match="split the batch"):
        kernel_segment_length(4096, 4096, 64, 10**6)


def test_conv_segment_length():
    assert conv_segment_length(1, 6, 10**8, 4) == 10**8
    seg = conv_segment_length(1, 384, 2 * 10**7, 4)
    assert seg < 2 * 10**7 and 384 * (seg + 3) <= UINT32_MAX
    assert conv_segment_length(1, 1, 2**31 + 5, 4) + 3 <= INT32_MAX


def test_auto_picks_highest_priority_supporting_backend(monkeypatch):
    calls = []

    def fake(*args):
        calls.append(args[0].shape[-1])
        return reference_scan(*args)

    monkeypatch.setattr(scan_mod, "_BACKENDS", dict(scan_mod._BACKENDS))
    register_backend("fake", fake, lambda info: info.length > 20, priority=100)
    inputs = {k: v.float() for k, v in make_inputs(length=30).items()}
    selective_scan(**inputs)
    short = {k: (v[..., :10] if v.dim() == 3 else v) for k, v in inputs.items()}
    selective_scan(**short)
    assert calls == [30]  # the short call went to the reference


def test_backend_errors():
    inputs = {k: v.float() for k, v in make_inputs().items()}
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(**inputs, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
            selective_scan(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :5]})
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", reference_scan, lambda info: True, 0)


def test_scan_info_reaches_supports(monkeypatch):
    seen = []
    monkeypatch.setattr(scan_mod, "_BACKENDS", dict(scan_mod._BACKENDS))
    register_backend("probe", reference_scan, lambda info: seen.append(info) or True, priority=100)
    inputs = {k: v.float().requires_grad_(True) for k, v in make_inputs(batch=2, channels=3, state=5,
                                                                         length=11).items()}
    selective_scan(**inputs, return_last_state=True)
    assert seen == [ScanInfo(2, 3, 5, 11, torch.device("cpu"), torch.float32, True, True)]


def test_import_does_not_pull_cuda_packages():
    code = ("import sys, methods.ssm, torch; m = methods.ssm.BiMambaMixer(4); m(torch.randn(1, 9, 4)); "
            "assert not {'mamba_ssm', 'causal_conv1d'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_stock_kernel_backward_receives_contiguous_gradients():
    """The stock kernel's backward needs dout rows aligned; the gradient of one segment of a concatenated
    output is a strided slice, which the wrapper makes contiguous."""
    from methods.ssm.cuda import _ContiguousGrad

    seen = []

    class Probe(torch.autograd.Function):  # stands in for the kernel: records what its backward gets
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.is_contiguous())
            return grad

    for wrap in (lambda y: y, _ContiguousGrad.apply):
        x = torch.randn(2, 3, 10, requires_grad=True)
        y = wrap(Probe.apply(x))
        (torch.cat([y, torch.randn(2, 3, 5)], dim=-1) * torch.randn(2, 3, 15)).sum().backward()
    assert seen == [False, True]
