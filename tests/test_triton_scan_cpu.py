"""The Triton scan's kernels in Triton's interpreter on the CPU (so CI without a GPU checks them): output,
last state and every gradient against the float64 oracle, with several segments, two channel blocks
(dB / dC added atomically across blocks), a length that is no multiple of the chunk and deltas on both
sides of softplus' threshold. The GPU runs of the same kernels are tests/test_triton_scan.py. Also: the
CUDA scan's wrapper refuses CPU tensors before it compiles anything, its plan gives every pass a group
that fits, the CUDA channel ops leave shapes past CUDA's grid limit to Triton, and the mixer fuses a
branch only where its CUDA kernels run it."""
import pytest
import torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def check_scan() -> None:
    from methods.ssm import triton_scan
    from methods.ssm.scan import selective_scan_ref

    triton_scan.TARGET_PROGRAMS = 12  # 2 channel blocks x 6 segments of a short sequence
    gen = torch.Generator().manual_seed(0)
    batch, channels, length, state = 2, 12, 101, 16

    def draw(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift

    delta = draw(batch, channels, length, scale=0.5, shift=-1.0)
    # every 5th token far from softplus' usual range: past its threshold of 20 (identity, slope 1; up to 100,
    # where exp overflows in float32) and down to -40
    delta[..., ::5] = torch.rand(delta[..., ::5].shape, generator=gen, dtype=torch.float64) * 140 - 40
    values = {"u": draw(batch, channels, length), "delta": delta,
              "A": -torch.exp(draw(channels, state, scale=0.5)), "B": draw(batch, state, length),
              "C": draw(batch, state, length), "D": draw(channels), "z": draw(batch, channels, length),
              "delta_bias": draw(channels, scale=0.3)}
    ins = {k: v.float().requires_grad_(True) for k, v in values.items()}
    oracle = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    out, last = triton_scan.selective_scan_triton(**ins, delta_softplus=True, return_last_state=True)
    ref, ref_last = selective_scan_ref(**oracle, delta_softplus=True, return_last_state=True)
    dout = draw(batch, channels, length)
    grads = torch.autograd.grad(out, list(ins.values()), dout.float())
    ref_grads = torch.autograd.grad(ref, list(oracle.values()), dout)
    pairs = {"out": (out, ref), "last": (last, ref_last),
             **{"d" + name: pair for name, pair in zip(NAMES, zip(grads, ref_grads))}}
    for name, (got, want) in pairs.items():
        err = ((got.detach().double() - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_scan_matches_float64_oracle_in_the_triton_interpreter(triton_interpreter):
    triton_interpreter(__file__)


if __name__ == "__main__":
    check_scan()


def test_cuda_scan_rejects_cpu_tensors_before_building():
    """On CPU tensors the CUDA scan says what to use, without trying to compile its extension."""
    from methods.ssm import cuda_scan

    u = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="run on CUDA tensors; use backend='reference'"):
        cuda_scan.selective_scan_cuda_sp(u, u, -torch.ones(4, 16), torch.randn(1, 16, 64),
                                         torch.randn(1, 16, 64))
    assert cuda_scan.extension.cache_info().currsize == 0, "it tried to compile the extension"


def test_cuda_scan_plan_gives_every_pass_a_group_that_holds_the_channels():
    """Each pass's group is one the kernels are built for and, up to 16 channels, holds every channel
    in one block (so dB | dC need no atomic adds); all passes put the same segments in a block: they
    read each other's per-segment and per-block sums."""
    from methods.ssm import cuda_scan

    for channels in range(1, 70):
        geo = cuda_scan.plan(1, channels, 10**6)
        assert set(geo.groups) == set(cuda_scan.KERNELS)
        for kernel, group in geo.groups.items():
            assert group in cuda_scan.THREADS, (channels, kernel, group)
            assert channels > 16 or channels <= group // 2, (channels, kernel, group)
        assert len({cuda_scan.THREADS[g] // g for g in geo.groups.values()}) == 1, (channels, geo.groups)
        assert geo.n_cblk == -(-channels // (geo.groups["bwd_main"] // 2))
        assert geo.n_seg * geo.seg_len >= 10**6 > (geo.n_seg - 1) * geo.seg_len


def test_cuda_channel_ops_leave_shapes_past_the_grid_limit_to_triton(monkeypatch):
    """The CUDA convolution launches batch x channels blocks along its grid's second dimension and the
    linear maps batch, which CUDA caps at 65535: past that `conv_supports` / `linear_supports` say no,
    so the Triton kernels run (checked on a stand-in for a CUDA tensor, with the extension stubbed)."""
    from types import SimpleNamespace

    from methods.ssm import cuda_channel

    class Ext:
        def linear_supports(self, k_in, n_out):
            return (k_in, n_out) == (3, 12)

    monkeypatch.setattr(cuda_channel, "_ext", Ext)

    def on_cuda(*shape):
        return SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=shape)

    weight = torch.zeros(8192, 1, 4)
    assert cuda_channel.conv_supports(on_cuda(7, 8192, 100), weight)     # 57,344 rows
    assert not cuda_channel.conv_supports(on_cuda(8, 8192, 100), weight)  # 65,536 rows
    assert not cuda_channel.conv_supports(on_cuda(7, 8192, 100), torch.zeros(8192, 1, 5))  # width 5
    assert cuda_channel.linear_supports(on_cuda(65535, 3, 10), torch.zeros(12, 3))
    assert not cuda_channel.linear_supports(on_cuda(65536, 3, 10), torch.zeros(12, 3))
    assert not cuda_channel.linear_supports(on_cuda(1, 6, 10), torch.zeros(38, 6))


def test_fused_branch_needs_the_cuda_scan_a_compiled_width_and_rows_within_the_grid(monkeypatch):
    """The mixer fuses a branch only where "auto" would take the CUDA scan, the convolution's width is
    compiled and batch x channels fits the convolution's grid (stand-in CUDA tensors, scan rule and
    extension stubbed)."""
    from types import SimpleNamespace

    from methods.ssm import backends_gpu, cuda_channel

    monkeypatch.setattr(backends_gpu, "_kernels_enabled", True)
    monkeypatch.setattr(backends_gpu, "cuda_sp_supports", lambda info: info.channels <= 16)
    monkeypatch.setattr(cuda_channel, "_ext", object)  # built, without compiling it

    def xz(batch, channels):
        return SimpleNamespace(is_cuda=True, shape=(batch, 2 * channels, 5000), device=torch.device("cuda"),
                               dtype=torch.bfloat16)

    assert backends_gpu.fused_branch_supports(xz(1, 6), 16, 4, True, "auto")
    assert not backends_gpu.fused_branch_supports(xz(1, 24), 16, 4, True, "auto")     # the Triton scan's
    assert not backends_gpu.fused_branch_supports(xz(1, 6), 16, 5, True, "auto")      # width 5
    assert not backends_gpu.fused_branch_supports(xz(1, 6), 16, 4, True, "triton")    # asked for Triton
    assert not backends_gpu.fused_branch_supports(xz(10923, 6), 16, 4, True, "auto")  # 65,538 rows


def test_fused_branch_folds_x_proj_and_returns_its_gradients_as_autograd_would():
    """The fused branch prepares x_proj with dt_proj folded in inside its own node; its backward of the fold
    gives the gradients autograd gives through `fold_x_proj` (float64, so to rounding)."""
    from methods.ssm.fused_branch import _fold_backward
    from methods.ssm.mixer import fold_x_proj

    gen = torch.Generator().manual_seed(0)
    x_w = torch.randn(2 + 32, 6, generator=gen, dtype=torch.float64, requires_grad=True)  # dt_rank 2
    dt_w = torch.randn(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    d_fold = torch.randn(6 + 32, 6, generator=gen, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the product is taken in the weights' precision
        folded = fold_x_proj(x_w, dt_w, torch.float64)
    assert torch.allclose(folded[:6], dt_w @ x_w[:2]) and torch.equal(folded[6:], x_w[2:])
    want = torch.autograd.grad(folded, [x_w, dt_w], d_fold)
    got = _fold_backward(d_fold, x_w.detach(), dt_w.detach())
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.allclose(g, w, rtol=1e-12, atol=1e-12)
    # autocast leaves float64 alone, so the precision claim needs float32 weights: a bf16 product would be
    # off by ~1e-2
    x32, dt32 = x_w.detach().float(), dt_w.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded32 = fold_x_proj(x32, dt32, torch.float32)
    assert torch.allclose(folded32[:6].double(), dt32.double() @ x32[:2].double(), rtol=1e-5, atol=1e-5)
