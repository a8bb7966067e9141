"""The sequence-parallel scans, Triton (methods/ssm/triton_scan.py) and CUDA (methods/ssm/cuda_scan.py),
against the float64 CPU oracle (methods.ssm.scan.selective_scan_ref): outputs, last state and every
gradient, on fresh random data, fp32 and bf16 inputs, at lengths that are no multiple of any block or
segment size and with several segments, superblocks and channel blocks."""
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from methods.ssm.scan import selective_scan_ref  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _channel_last(x):
    """The same values as a (batch, rows, L) view of (batch, L, rows) memory, like the mixer's views."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _inputs(batch, channels, length, state, dtype, with_d, with_z, with_bias, softplus, gen,
            strided=False, wide_delta=False):
    def draw(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    delta = draw(batch, channels, length, scale=0.5, shift=-1.0) if softplus else \
        draw(batch, channels, length).abs() * 0.3
    if wide_delta:  # every 5th token from -40 to 100: past softplus' threshold of 20, and exp's float32 range
        delta[..., ::5] = torch.rand(delta[..., ::5].shape, generator=gen, dtype=torch.float64) * 140 - 40
    values = {"u": draw(batch, channels, length), "delta": delta,
              "A": -torch.exp(draw(channels, state, scale=0.5)),
              "B": draw(batch, state, length), "C": draw(batch, state, length),
              "D": draw(channels) if with_d else None, "z": draw(batch, channels, length) if with_z else None,
              "delta_bias": draw(channels, scale=0.3) if with_bias else None}
    on_device = {}
    for name, x in values.items():
        if x is None:
            on_device[name] = None
            continue
        sequence = name in ("u", "delta", "B", "C", "z")
        x = x.to(dtype if sequence else torch.float32).cuda()
        if strided and sequence:
            x = _channel_last(x)
        on_device[name] = x.requires_grad_(True)
    return on_device


def _poison_allocator():
    """Fill the blocks PyTorch's caching allocator will hand out next with NaN, so that an output
    element the kernel never writes shows up as NaN (small pool: blocks under 1 MB; large pool)."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [2**15] * 96 + [2**21] * 12]
    del blocks


def _rel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


IMPLS = ("triton", "cuda")


def _scan_fn(impl, monkeypatch, target_programs=None):
    """The scan `impl`; with target_programs, geometry forced to many segments on a short sequence."""
    if impl == "triton":
        from methods.ssm import triton_scan

        if target_programs is not None:
            monkeypatch.setattr(triton_scan, "TARGET_PROGRAMS", target_programs)
        return triton_scan.selective_scan_triton
    from methods.ssm import cuda_scan

    assert cuda_scan.extension() is not None, "the CUDA scan did not build (see the warning)"
    if target_programs is not None:  # blocks of 4-8 segments: several superblocks per sequence
        monkeypatch.setattr(cuda_scan, "TARGET_BLOCKS", max(1, target_programs // 8))
        monkeypatch.setattr(cuda_scan, "MIN_SEGMENT", 8)
    return cuda_scan.selective_scan_cuda_sp


def _check(batch, channels, length, state, dtype, tol, *, with_d=True, with_z=True, with_bias=True,
           softplus=True, target_programs=None, seed=0, monkeypatch=None, strided=False, impl="triton",
           wide_delta=False):
    scan = _scan_fn(impl, monkeypatch, target_programs)
    gen = torch.Generator().manual_seed(seed)
    ins = _inputs(batch, channels, length, state, dtype, with_d, with_z, with_bias, softplus, gen, strided,
                  wide_delta)
    oracle_ins = {k: None if v is None else v.detach().double().cpu().requires_grad_(True)
                  for k, v in ins.items()}
    dout = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)

    _poison_allocator()
    out, last = scan(*ins.values(), delta_softplus=softplus, return_last_state=True)
    ref, ref_last = selective_scan_ref(*oracle_ins.values(), delta_softplus=softplus,
                                       return_last_state=True)
    assert out.dtype == dtype and out.shape == (batch, channels, length)
    errors = {"out": _rel(out, ref), "last_state": _rel(last, ref_last)}
    _poison_allocator()
    dout_device = dout.to(dtype).cuda()
    out.backward(_channel_last(dout_device) if strided else dout_device)
    ref.backward(dout.to(dtype).double())
    for name in NAMES:
        if ins[name] is not None:
            assert ins[name].grad is not None and ins[name].grad.dtype == ins[name].dtype, name
            errors["d" + name] = _rel(ins[name].grad, oracle_ins[name].grad)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


CASES = [
    (1, 6, 4099, 16, None),     # Pixel-Mamba layer-1 width, one channel block
    (2, 6, 1000, 16, 64),       # many short segments (uneven last one)
    (1, 20, 777, 16, 12),       # several channel blocks: dB / dC accumulate across blocks
    (1, 12, 70001, 16, None),   # 16 channel slots, a partial last superblock
    (1, 3, 33, 5, 2),           # odd state count (Triton only), length one past a chunk
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,channels,length,state,target_programs", CASES)
def test_fp32_matches_oracle(batch, channels, length, state, target_programs, impl, monkeypatch):
    if impl == "cuda" and state != 16:
        pytest.skip("the CUDA scan is built for d_state 16")
    _check(batch, channels, length, state, torch.float32, 1e-4, target_programs=target_programs,
           seed=length, monkeypatch=monkeypatch, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_without_optional_inputs(impl, monkeypatch):
    _check(2, 12, 517, 16, torch.float32, 1e-4, with_d=False, with_z=False, with_bias=False,
           softplus=False, target_programs=16, seed=1, monkeypatch=monkeypatch, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_softplus_past_its_threshold(impl, monkeypatch):
    """Deltas where softplus is the identity with slope 1 (above 20; above ~88 its general formula overflows
    float32 and would give NaN) and deep in its tail, forward and gradients."""
    _check(1, 6, 1001, 16, torch.float32, 1e-4, target_programs=16, seed=5, monkeypatch=monkeypatch,
           impl=impl, wide_delta=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_strided_views_match_oracle(impl, monkeypatch):
    """Inputs and output gradient as transposed views (the mixer's layout) give the same results."""
    _check(2, 6, 1234, 16, torch.float32, 1e-4, target_programs=24, seed=7, monkeypatch=monkeypatch,
           strided=True, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels,length", [(6, 3001), (48, 1500)])
def test_bf16_inputs_match_oracle(channels, length, impl, monkeypatch):
    _check(1, channels, length, 16, torch.bfloat16, 1e-2, target_programs=32, seed=channels,
           monkeypatch=monkeypatch, impl=impl)


@pytest.mark.parametrize("group,channels", [(12, 6), (16, 6), (24, 12), (32, 12)])
def test_cuda_scan_matches_oracle_with_every_pass_in_one_group(group, channels, monkeypatch):
    """The kernels of each group, also those `cuda_scan.groups` picks for no pass at these widths today:
    blocks of 96 threads (groups across warps) and of 128, with a partial last superblock."""
    from methods.ssm import cuda_scan

    monkeypatch.setattr(cuda_scan, "groups", lambda channels: dict.fromkeys(cuda_scan.KERNELS, group))
    _check(2, channels, 2077, 16, torch.float32, 1e-4, target_programs=24, seed=group,
           monkeypatch=monkeypatch, impl="cuda")


@pytest.mark.parametrize("n", [1, 300, 8197])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_carry_matches_a_serial_float64_chain(n, reverse):
    """The carry between superblocks, with stretches of one and of several superblocks per thread (8,197 of
    them: more than the kernel's 1,024 threads), against the chain walked one superblock at a time."""
    from methods.ssm import cuda_scan

    if cuda_scan.extension() is None:
        pytest.skip("the CUDA scan does not build here")
    gen = torch.Generator().manual_seed(n)
    channels, rows = 3, 6
    summary = torch.randn(rows, n, 16, generator=gen)
    # decays of 0.8-1 a superblock: a carry remembers a few stretches back (slower decays let float32
    # rounding over thousands of superblocks, not the kernel, set the error)
    dtsum = torch.rand(rows, n, generator=gen) * 0.1
    A = -torch.rand(channels, 16, generator=gen) * 1.5 - 0.5
    carry = torch.empty(rows, n + 1, 16, device="cuda")
    cuda_scan.extension().carry(summary.cuda(), dtsum.cuda(), A.cuda(), carry, reverse)
    decay = torch.exp(dtsum.double()[:, :, None] * A.double().repeat(rows // channels, 1)[:, None, :])
    ref = torch.zeros(rows, n + 1, 16, dtype=torch.float64)
    steps = range(n - 1, -1, -1) if reverse else range(n)
    S = torch.zeros(rows, 16, dtype=torch.float64)
    for k in steps:
        S = decay[:, k] * S + summary.double()[:, k]
        ref[:, k if reverse else k + 1] = S
    assert torch.allclose(carry.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_cuda_scan_reads_misaligned_rows(monkeypatch):
    """Rows that do not start on 16 bytes (an odd length in one buffer) take the scalar loads."""
    _check(1, 6, 1001, 16, torch.bfloat16, 1e-2, target_programs=16, seed=3, monkeypatch=monkeypatch,
           impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
def test_fresh_draws_give_fresh_results(impl, monkeypatch):
    """Two different draws give different outputs (the kernel reads its inputs, not stale memory)."""
    scan = _scan_fn(impl, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    outs = []
    for _ in range(2):
        ins = _inputs(1, 6, 300, 16, torch.float32, True, True, True, True, gen)
        outs.append(scan(*ins.values(), delta_softplus=True).detach())
    assert not torch.allclose(outs[0], outs[1])


def test_rejects_grouped_B():
    from methods.ssm.triton_scan import selective_scan_triton

    u = torch.randn(1, 4, 64, device="cuda")
    A = -torch.ones(4, 16, device="cuda")
    B = torch.randn(1, 1, 16, 64, device="cuda")
    with pytest.raises(ValueError, match="input-dependent"):
        selective_scan_triton(u, u, A, B, B)
