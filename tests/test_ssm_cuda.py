"""Kernel paths on CUDA (mamba_ssm + causal_conv1d; our Triton scan and convolution) against the CPU
reference path, fp32, forward and backward.

Needs a GPU with the `gpu` extra installed; run on the device with `pytest tests/test_ssm_cuda.py -m cuda`."""
import contextlib
import copy
import dataclasses

import pytest
import torch

from methods.ssm import BiMambaMixer, SRMambaMixer, backends_gpu, cuda as ssm_cuda, selective_scan
from methods.ssm.cuda import conv_kernel_available, scan_kernel_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOLERANCE = 1e-4  # relative (norm) error, fp32


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def exact_fp32():
    if not (scan_kernel_available() and conv_kernel_available()):
        pytest.fail("mamba_ssm / causal_conv1d do not import on this GPU machine: install the `gpu` extra")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def scan_inputs(batch=2, channels=8, state=16, length=4099, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"u": r(batch, channels, length), "delta": r(batch, channels, length) - 2,
            "A": -torch.exp(r(channels, state)), "B": r(batch, state, length), "C": r(batch, state, length),
            "D": r(channels), "z": r(batch, channels, length), "delta_bias": r(channels)}


def run_scan(inputs, device, backend, weight):
    leaves = {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend=backend)
    (y * weight.to(device)).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("segment", [None, 2048])
def test_scan_kernel_equals_cpu_reference(monkeypatch, segment):
    """segment=2048 forces the split along L (as past the kernel's 32-bit limits) with state carrying."""
    if segment:
        monkeypatch.setattr(ssm_cuda, "kernel_segment_length", lambda *shape: segment)
    inputs = scan_inputs()
    weight = torch.randn(2, 8, 4099)
    y_gpu, g_gpu = run_scan(inputs, "cuda", "cuda", weight)
    y_cpu, g_cpu = run_scan(inputs, "cpu", "reference", weight)
    assert rel_err(y_gpu, y_cpu) < TOLERANCE
    for name in g_cpu:
        assert rel_err(g_gpu[name], g_cpu[name]) < TOLERANCE, name


def test_scan_kernel_last_state(monkeypatch):
    monkeypatch.setattr(ssm_cuda, "kernel_segment_length", lambda *shape: 2048)
    inputs = {k: v.cuda() for k, v in scan_inputs().items()}
    _, h_gpu = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="cuda")
    _, h_ref = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="reference")
    assert rel_err(h_gpu, h_ref) < TOLERANCE


@pytest.mark.parametrize("mixer", [BiMambaMixer, SRMambaMixer])
@pytest.mark.parametrize("path,split", [("ours", False), ("stock", False), ("stock", True)])
@pytest.mark.parametrize("d_model", [3, 24])
def test_mixer_kernel_path_equals_cpu_path(monkeypatch, mixer, path, split, d_model):
    """ours: our scans (the CUDA one at d_model 3, Triton at 24) and convolution; stock: mamba_ssm and
    causal_conv1d only, split along L (as past their 32-bit limits) when `split`."""
    if split:
        monkeypatch.setattr(ssm_cuda, "kernel_segment_length", lambda *shape: 2048)
        monkeypatch.setattr(ssm_cuda, "conv_segment_length", lambda *shape: 1000)
    with backends_gpu.triton_disabled() if path == "stock" else contextlib.nullcontext():
        _check_mixer_against_cpu(mixer, d_model)


@pytest.mark.parametrize("d_model,batch", [(3, 1), (3, 2), (24, 2)])
@pytest.mark.parametrize("kernels", ["triton_linear", "cuda_channel"])
def test_bimamba_channel_first_path_equals_cpu_path(d_model, batch, kernels):
    """The path bf16 training takes (token-wise projections, reversed reads for the backward branch;
    at d_model 3 each branch one fused autograd node on the CUDA scan, its gradients written in place at
    batch 1), here in fp32 against the CPU to 1e-4: fp32 mixers choose cuBLAS, so it is called
    directly."""
    import importlib

    linear = importlib.import_module(f"methods.ssm.{kernels}").channel_linear
    _check_mixer_against_cpu(BiMambaMixer, d_model, lambda module, x: module._forward_channel_first(x, linear),
                             batch=batch)


def _check_mixer_against_cpu(mixer, d_model, gpu_forward=None, batch=2):
    torch.manual_seed(0)
    cpu = mixer(d_model)
    gpu = copy.deepcopy(cpu).cuda()
    hidden = torch.randn(batch, 5001, d_model)
    weight = torch.randn(batch, 5001, d_model)
    outs, grads = [], []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        x = hidden.clone().to(device).requires_grad_(True)  # a leaf on each device
        out = gpu_forward(module, x) if gpu_forward and device == "cuda" else module(x)
        (out * weight.to(device)).sum().backward()
        outs.append(out)
        grads.append({"input": x.grad, **{n: p.grad for n, p in module.named_parameters()}})
    assert rel_err(outs[1], outs[0]) < TOLERANCE
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < TOLERANCE, name


@pytest.mark.parametrize("d_model", [3, 48])
def test_mixer_bf16_autocast_runs_on_kernels(d_model):
    """Under bf16 autocast the output is bf16 and within bf16 rounding of the fp32 run, input gradient
    included."""
    torch.manual_seed(0)
    m = BiMambaMixer(d_model).cuda()
    x = torch.randn(1, 100_000, d_model, device="cuda", requires_grad=True)
    weight = torch.randn(1, 100_000, d_model, device="cuda")
    outs, grads = [], []
    for autocast in (True, False):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = m(x)
        outs.append(out)
        grads.append(torch.autograd.grad((out.float() * weight).sum(), x)[0])
    assert outs[0].dtype == torch.bfloat16 and torch.isfinite(grads[0]).all()
    assert rel_err(outs[0], outs[1]) < 5e-2 and rel_err(grads[0], grads[1]) < 5e-2


def test_auto_picks_the_cuda_scan_where_it_was_faster_and_the_mixer_agrees_with_triton():
    """"auto" runs the CUDA scan (cuda_sp) for inference up to 768 channels and for training up to 48,
    the Triton scan elsewhere; a 6-channel mixer's outputs and gradients on the CUDA scan equal those on
    the Triton scan to 1e-4 in fp32."""
    from methods.ssm import cuda_scan
    from methods.ssm.scan import ScanInfo, _pick_backend

    assert cuda_scan.extension() is not None, "the CUDA scan did not build (see the warning)"
    info = ScanInfo(1, 6, 16, 5001, torch.device("cuda"), torch.float32, False, False)
    picked = {(channels, grad): _pick_backend("auto", dataclasses.replace(info, channels=channels,
                                                                          needs_grad=grad)).name
              for channels in (6, 12, 24, 48, 96, 768, 1536) for grad in (False, True)}
    assert picked == {(6, False): "cuda_sp", (6, True): "cuda_sp", (12, False): "cuda_sp",
                      (12, True): "cuda_sp", (24, False): "cuda_sp", (24, True): "cuda_sp",
                      (48, False): "cuda_sp", (48, True): "cuda_sp", (96, False): "cuda_sp",
                      (96, True): "triton", (768, False): "cuda_sp", (768, True): "triton",
                      (1536, False): "triton", (1536, True): "triton"}
    torch.manual_seed(0)
    on_cuda = BiMambaMixer(3).cuda()
    on_triton = copy.deepcopy(on_cuda)
    for module in on_triton.modules():
        if hasattr(module, "backend"):
            module.backend = "triton"
    results = []
    for mixer in (on_cuda, on_triton):
        x = torch.randn(2, 5001, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(1),
                        requires_grad=True)
        out = mixer(x)
        grads = torch.autograd.grad(out.square().mean(), [x, *mixer.parameters()])
        results.append([out, *grads])
    for ours, reference in zip(*results):
        assert rel_err(ours, reference) < TOLERANCE
