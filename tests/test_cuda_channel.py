"""The CUDA token-wise ops (methods/ssm/cuda_channel.py) and the mixer's fused branch
(methods/ssm/fused_branch.py) on the GPU: the convolution and the linear maps against float64
references (the checks of test_triton_conv.py and test_triton_linear.py), the convolution's second
gradient and strided gradient buffer, the convolution with x_proj in one kernel, the two in_proj maps
with one gradient, out_proj of both branches in one pass, the scan writing its gradients into slices of
one buffer, and the fused branch against the unfused one."""
import pytest
import torch
import torch.nn.functional as F

from tests.test_triton_conv import check_conv
from tests.test_triton_linear import CASES as LINEAR_CASES, check_linear
from tests.test_triton_scan import _channel_last

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# the shapes the CUDA kernel is compiled for: in_proj 3 -> 12, out_proj 6 -> 3 and 12 -> 6
CUDA_LINEAR_CASES = [(2, 12, 6, 1001, False, True, True, torch.float32, 1e-5),
                     (1, 12, 6, 77, True, False, False, torch.bfloat16, 1e-2),
                     (3, 3, 12, 4099, True, True, False, torch.bfloat16, 1e-2)]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def extension():
    from methods.ssm import cuda_scan

    assert cuda_scan.extension() is not None, "the CUDA extension did not build (see the warning)"


def test_conv_matches_float64_conv1d():
    from methods.ssm import cuda_channel

    check_conv("cuda", cuda_channel.causal_conv1d_silu)


@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_backward_adds_a_second_gradient_and_writes_into_a_slice(width):
    """dx written into the x half of a (batch, 2E, L) buffer leaves the other half alone; widths 2-4;
    a length that is no multiple of a thread's 8 tokens or a block's 1024."""
    from methods.ssm import cuda_channel

    gen = torch.Generator().manual_seed(width)
    batch, channels, length = 2, 5, 2061
    xz = torch.randn(batch, 2 * channels, length, generator=gen, dtype=torch.float64)
    w = torch.randn(channels, 1, width, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=True)
    dy, dy2 = (torch.randn(batch, channels, length, generator=gen, dtype=torch.float64) for _ in range(2))
    x = xz[:, :channels].clone().requires_grad_(True)
    ref = F.silu(F.conv1d(F.pad(x, (width - 1, 0)), w, b, groups=channels))
    want = torch.autograd.grad(ref, [x, w, b], dy + dy2)

    gpu = xz.float().cuda()
    buffer = torch.full_like(gpu, 7.0)
    y = cuda_channel.conv_forward(gpu[:, :channels], w.detach().float().cuda(), b.detach().float().cuda())
    dx, dw, db = cuda_channel.conv_backward(gpu[:, :channels], w.detach().float().cuda(), b.detach().float().cuda(),
                                            dy.float().cuda(), dy2.float().cuda(), dx=buffer[:, :channels])
    assert dx.data_ptr() == buffer.data_ptr() and (buffer[:, channels:] == 7.0).all()
    for name, got, ref_value in (("y", y, ref), ("dx", dx, want[0]), ("dw", dw, want[1]), ("db", db, want[2])):
        assert rel_err(got, ref_value) < 1e-5, name


@pytest.mark.parametrize("channels,width,dtype,tol", [(6, 4, torch.float32, 1e-5), (6, 3, torch.bfloat16, 1e-2),
                                                     (12, 4, torch.bfloat16, 1e-2), (5, 4, torch.float32, 1e-5)])
def test_conv_and_projection_in_one_kernel_match_float64(channels, width, dtype, tol):
    """conv_proj_forward: u = silu(conv(x)) and proj = w_proj u (x_proj's 6 -> 38 and 12 -> 44, one
    kernel; 5 channels take the two kernels) against float64, x a slice of a (batch, 2E, L) buffer, at
    a length that is no multiple of a thread's 8 tokens or a block's 1024."""
    from methods.ssm import cuda_channel

    gen = torch.Generator().manual_seed(channels * width)
    batch, length, outputs = 2, 2061, channels + 32
    xz = torch.randn(batch, 2 * channels, length, generator=gen, dtype=torch.float64)
    w = torch.randn(channels, 1, width, generator=gen, dtype=torch.float64)
    b = torch.randn(channels, generator=gen, dtype=torch.float64)
    w_proj = torch.randn(outputs, channels, generator=gen, dtype=torch.float64) / channels ** 0.5
    x = xz[:, :channels].to(dtype).double()
    u_want = F.silu(F.conv1d(F.pad(x, (width - 1, 0)), w.float().double(), b.float().double(), groups=channels))
    # the projection reads u as stored, rounded to the dtype
    proj_want = torch.einsum("ne,bel->bnl", w_proj.to(dtype).double(), u_want.to(dtype).double())
    assert cuda_channel._ext().conv_proj_supports(channels, outputs) == (channels != 5)
    gpu = xz.to("cuda", dtype)
    u, proj = cuda_channel.conv_proj_forward(gpu[:, :channels], w.float().cuda(), b.float().cuda(),
                                             w_proj.to("cuda", dtype))
    assert u.shape == (batch, channels, length) and proj.shape == (batch, outputs, length)
    assert u.dtype == proj.dtype == dtype
    assert rel_err(u, u_want) < tol and rel_err(proj, proj_want) < tol


def test_linear_matches_float64_matmuls():
    from methods.ssm import cuda_channel

    check_linear("cuda", cuda_channel.channel_linear, LINEAR_CASES + CUDA_LINEAR_CASES)
    assert cuda_channel.linear_supports(torch.zeros(1, 3, 8, device="cuda"), torch.zeros(12, 3))
    assert not cuda_channel.linear_supports(torch.zeros(1, 6, 8, device="cuda"), torch.zeros(38, 6))


@pytest.mark.parametrize("length", [4096, 4099])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("k_in,n_out", [(3, 12), (6, 3), (12, 6)])
def test_linear_maps_in_the_mixer_layouts_match_float64(k_in, n_out, dtype, tol, reverse, length):
    """The layouts whose forward takes the 8-token kernels: in_proj's (x and dx token-major, y and dy
    channel-first) and out_proj's (x and dx channel-first, y and dy token-major), at a length of whole
    chunks of 8 and one with a partial chunk and rows that do not start on 16 bytes, read and written
    backwards too; the backward (one-token kernel) on the same layouts."""
    from methods.ssm import cuda_channel

    gen = torch.Generator().manual_seed(k_in * length)
    batch = 2
    x64 = torch.randn(batch, k_in, length, generator=gen, dtype=torch.float64)
    w64 = torch.randn(n_out, k_in, generator=gen, dtype=torch.float64)
    dy64 = torch.randn(batch, n_out, length, generator=gen, dtype=torch.float64)
    src = x64.flip(-1) if reverse else x64
    dx64 = torch.einsum("nk,bnl->bkl", w64, dy64)
    want = dict(y=torch.einsum("nk,bkl->bnl", w64, src), dx=dx64.flip(-1) if reverse else dx64,
                dw=torch.einsum("bnl,bkl->nk", dy64, src))
    x_token_major = k_in < n_out  # in_proj widens, out_proj narrows
    x = x64.to("cuda", dtype)
    dy = dy64.to("cuda", dtype)
    x, dy = (_channel_last(x), dy) if x_token_major else (x, _channel_last(dy))
    w = w64.to("cuda", torch.float32)
    y = cuda_channel.linear_forward(x, w, reverse, token_major_out=not x_token_major)
    dx, dw = cuda_channel.linear_backward(x, w, dy, reverse)
    assert dx.stride() == x.stride()
    for name, got in (("y", y), ("dx", dx), ("dw", dw)):
        assert rel_err(got, want[name]) < tol, name


@pytest.mark.parametrize("x_dtype,length", [(torch.float32, 4099), (torch.bfloat16, 4096)])
def test_in_proj_pair_reads_and_returns_the_input_dtype(x_dtype, length):
    """linear_pair: in_proj forwards and backwards (bf16 outputs) from a token-major float32 or bf16
    input, against float64; the backward sums both maps' gradients into one dx of the input's dtype and
    layout, and dw in the weight's dtype."""
    from methods.ssm import cuda_channel

    gen = torch.Generator().manual_seed(length)
    batch, k_in, n_out = 2, 3, 12
    hidden = torch.randn(batch, length, k_in, generator=gen, dtype=torch.float64)
    weight = torch.randn(n_out, k_in, generator=gen, dtype=torch.float64)
    dy, dy_b = (torch.randn(batch, n_out, length, generator=gen).to(torch.bfloat16) for _ in range(2))
    x64 = hidden.to(x_dtype).double().transpose(1, 2)
    w64 = weight.float().to(torch.bfloat16).double()
    g = dy.double() + dy_b.double().flip(-1)  # the gradient at x[t]: from y[t] and from y_b[L - 1 - t]
    want = dict(y=w64 @ x64, y_b=(w64 @ x64).flip(-1), dx=(w64.T @ g).transpose(1, 2),
                dw=torch.einsum("bnl,bkl->nk", g, x64))

    x = hidden.to("cuda", x_dtype).requires_grad_(True)
    w = weight.to("cuda", torch.float32).requires_grad_(True)
    assert cuda_channel.linear_pair_supports(x.transpose(1, 2), w, torch.bfloat16)
    y, y_b = cuda_channel.linear_pair(x.transpose(1, 2), w, torch.bfloat16)
    dx, dw = torch.autograd.grad((y, y_b), (x, w), (dy.cuda(), dy_b.cuda()))
    assert y.dtype == y_b.dtype == torch.bfloat16 and dx.dtype == x_dtype and dw.dtype == torch.float32
    assert dx.stride() == x.stride()
    for name, got, tol in (("y", y, 1e-2), ("y_b", y_b, 1e-2), ("dx", dx, 1e-5 if x_dtype == torch.float32 else 1e-2),
                           ("dw", dw, 1e-5)):
        assert rel_err(got, want[name]) < tol, name
    assert not cuda_channel.linear_pair_supports(x.transpose(1, 2).contiguous(), w, torch.bfloat16)


@pytest.mark.parametrize("dtype,length,tol", [(torch.float32, 2061, 1e-5), (torch.bfloat16, 4099, 1e-2)])
def test_out_proj_of_both_branches_in_one_pass(dtype, length, tol):
    """linear_sum: w x[t] + w x2[L - 1 - t] token-major in one kernel, and its gradients (dx, dx2 read
    backwards, dw summed over both), against float64; a second input of another shape is refused."""
    from methods.ssm import cuda_channel

    gen = torch.Generator().manual_seed(length)
    batch, k_in, n_out = 2, 6, 3
    x, x2 = (torch.randn(batch, k_in, length, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(n_out, k_in, generator=gen).to(dtype)
    dy = torch.randn(batch, length, n_out, generator=gen).to(dtype).transpose(1, 2)  # as out.transpose's
    x64, x264, w64, g = x.double(), x2.double(), weight.double(), dy.double()
    want = dict(y=w64 @ (x64 + x264.flip(-1)), dx=w64.T @ g, dx2=(w64.T @ g).flip(-1),
                dw=torch.einsum("bnl,bkl->nk", g, x64 + x264.flip(-1)))

    leaves = [t.cuda().requires_grad_(True) for t in (x, x2, weight)]
    assert cuda_channel.linear_sum_supports(leaves[0], leaves[2])
    y = cuda_channel.linear_sum(*leaves)
    assert y.dtype == dtype and y.shape == (batch, n_out, length) and y.stride(1) == 1  # token-major
    dx, dx2, dw = torch.autograd.grad(y, leaves, dy.cuda())
    for name, got in (("y", y), ("dx", dx), ("dx2", dx2), ("dw", dw)):
        assert rel_err(got, want[name]) < tol, name
    with pytest.raises(ValueError, match="x2 must be shaped"):
        cuda_channel.linear_sum(leaves[0], leaves[1][:, :, 1:], leaves[2])


@pytest.mark.parametrize("batch", [1, 2])
def test_scan_writes_its_gradients_into_slices(batch):
    """ddelta, dB | dC and dz into slices of two buffers (whole rows at batch 1, through copies at 2)
    equal the gradients the scan returns on its own, bit for bit."""
    from methods.ssm import cuda_scan

    gen = torch.Generator(device="cuda").manual_seed(batch)
    channels, length = 6, 5003
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)  # noqa: E731
    u, delta, z = r(batch, channels, length), r(batch, channels, length), r(batch, channels, length)
    B, C = r(batch, 16, length), r(batch, 16, length)
    A = -torch.rand(channels, 16, device="cuda", generator=gen) * 4
    D, bias = torch.ones(channels, device="cuda"), torch.zeros(channels, device="cuda")
    dout = r(batch, channels, length)
    plain = cuda_scan.scan_backward(cuda_scan.scan_forward(u, delta, A, B, C, D, z, bias, True)[2], dout)
    d_proj = torch.full((batch, channels + 32, length), 7.0, device="cuda", dtype=torch.bfloat16)
    dxz = torch.full((batch, 2 * channels, length), 7.0, device="cuda", dtype=torch.bfloat16)
    into = cuda_scan.scan_backward(cuda_scan.scan_forward(u, delta, A, B, C, D, z, bias, True)[2], dout,
                                   ddelta=d_proj[:, :channels], dBC=d_proj[:, channels:], dz=dxz[:, channels:])
    for got, want in zip(into, plain):
        assert torch.equal(got, want)
    assert torch.equal(d_proj[:, :channels], plain[1]) and torch.equal(dxz[:, channels:], plain[6])
    assert torch.equal(d_proj[:, channels:], torch.cat(plain[3:5], dim=1)) and (dxz[:, :channels] == 7.0).all()


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_mixer_with_the_fused_branch_equals_it_without(monkeypatch, batch):
    """The 6-channel mixer under bf16 autocast, whose two branches run fused, against the same mixer with
    the branches as separate autograd nodes: output and every gradient within bf16 rounding."""
    from methods.ssm import BiMambaMixer, backends_gpu, fused_branch

    backends_gpu.register()
    torch.manual_seed(0)
    mixer = BiMambaMixer(3).cuda()
    x = torch.randn(batch, 70_001, 3, device="cuda", requires_grad=True)
    weight = torch.randn(batch, 70_001, 3, device="cuda")
    calls = []
    fused = fused_branch.fused_branch
    monkeypatch.setattr(fused_branch, "fused_branch", lambda *a: calls.append(1) or fused(*a))
    results = []
    for use_fused in (True, False):
        if not use_fused:
            monkeypatch.setattr(backends_gpu, "fused_branch_supports", lambda *a: False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer(x)
        results.append([out, *torch.autograd.grad((out.float() * weight).sum(), [x, *mixer.parameters()])])
    assert len(calls) == 2, "the fused branch did not run"
    names = ["output", "input", *(name for name, _ in mixer.named_parameters())]
    for name, got, want in zip(names, *results):
        assert rel_err(got, want) < 2e-2, name
