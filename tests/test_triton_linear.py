"""The Triton token-wise linear map (methods/ssm/triton_linear.py) against float64 matmuls: the output
and the gradients of x and W, for channel-first and token-major inputs and outputs, reversed token order,
batches, lengths that are no multiple of the token block, and K, N from 1 to beyond one output block.

On CUDA the kernels run on the GPU; on the CPU the same checks run in Triton's interpreter, with the
BiMamba mixer's channel-first path built on the map against its matmul path (on CUDA, test_ssm_cuda.py
checks that path against the CPU)."""
import pytest
import torch

# (batch, K, N, length, token-major x, reverse, token-major y, dtype, tolerance)
CASES = [(2, 3, 12, 333, True, False, False, torch.float32, 1e-5),     # in_proj of layer 1
         (1, 3, 12, 200, True, True, False, torch.float32, 1e-5),      # ... for the reversed branch
         (2, 6, 38, 150, False, False, False, torch.float32, 1e-5),    # x_proj + dt_proj
         (1, 6, 3, 129, False, True, True, torch.float32, 1e-5),       # out_proj of the reversed branch
         (1, 1, 70, 64, False, False, True, torch.float32, 1e-5),      # K = 1; N past one block of 64
         (2, 6, 38, 301, False, True, False, torch.bfloat16, 1e-2)]


def check_linear(device: str, channel_linear=None, cases=CASES) -> None:
    """channel_linear: the function under test (default: the Triton one)."""
    from methods.ssm import triton_linear

    channel_linear = channel_linear or triton_linear.channel_linear
    gen = torch.Generator().manual_seed(0)
    for batch, k_in, n_out, length, x_token_major, reverse, y_token_major, dtype, tol in cases:
        x64 = torch.randn(batch, k_in, length, generator=gen, dtype=torch.float64)
        w64 = torch.randn(n_out, k_in, generator=gen, dtype=torch.float64)
        dy64 = torch.randn(batch, n_out, length, generator=gen, dtype=torch.float64)
        src = x64.flip(-1) if reverse else x64
        want_y = torch.einsum("nk,bkl->bnl", w64, src)
        want_dx = torch.einsum("nk,bnl->bkl", w64, dy64)
        want_dx = want_dx.flip(-1) if reverse else want_dx
        want_dw = torch.einsum("bnl,bkl->nk", dy64, src)

        leaf = (x64.transpose(1, 2) if x_token_major else x64).to(device, dtype).requires_grad_(True)
        x = leaf.transpose(1, 2) if x_token_major else leaf
        w = w64.to(device, dtype).requires_grad_(True)
        y = channel_linear(x, w, reverse=reverse, token_major_out=y_token_major)
        assert y.shape == (batch, n_out, length) and y.dtype == dtype
        assert (y.transpose(1, 2) if y_token_major else y).is_contiguous()
        dx, dw = torch.autograd.grad(y, [leaf, w], dy64.to(device, dtype))
        dx = dx.transpose(1, 2) if x_token_major else dx
        for name, got, want in (("y", y, want_y), ("dx", dx, want_dx), ("dw", dw, want_dw)):
            err = ((got.detach().double().cpu() - want).norm() / want.norm()).item()
            assert err <= tol, f"{name}: relative error {err:.2e} > {tol} at {(batch, k_in, n_out, length)}"


def check_mixer_channel_first() -> None:
    """The mixer's channel-first path (reversed reads instead of flips, dt_proj folded into x_proj, half
    weights for the branch average) against its matmul path, on the CPU, both directions."""
    from methods.ssm.mixer import BiMambaMixer
    from methods.ssm.triton_linear import channel_linear

    torch.manual_seed(0)
    for bidirectional in (True, False):
        mixer = BiMambaMixer(3, bidirectional=bidirectional)
        hidden = torch.randn(2, 300, 3, requires_grad=True)
        weight = torch.randn(2, 300, 3)
        leaves = [hidden, *mixer.parameters()]
        want = mixer(hidden)
        want_grads = torch.autograd.grad((want * weight).sum(), leaves)
        got = mixer._forward_channel_first(hidden, channel_linear)
        assert got.shape == want.shape and got.is_contiguous()
        got_grads = torch.autograd.grad((got * weight).sum(), leaves)
        names = ["input", *(name for name, _ in mixer.named_parameters())]
        for name, g, w in zip(["output", *names], [got, *got_grads], [want, *want_grads]):
            err = ((g - w).norm() / w.norm()).item()
            assert err <= 1e-5, f"{name}: relative error {err:.2e} (bidirectional={bidirectional})"


def test_rejects_shapes_and_dtypes_it_cannot_run():
    from methods.ssm.triton_linear import channel_linear

    x = torch.zeros(1, 6, 10)
    with pytest.raises(ValueError, match="weight \\(N, K\\)"):
        channel_linear(x, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="share one of"):
        channel_linear(x, torch.zeros(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="use a matmul"):
        channel_linear(torch.zeros(1, 200, 10), torch.zeros(4, 200))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_matches_float64_on_gpu():
    check_linear("cuda")


def test_linear_and_the_mixer_path_on_it_in_the_triton_interpreter(triton_interpreter):
    triton_interpreter(__file__)


if __name__ == "__main__":
    check_linear("cpu")
    check_mixer_channel_first()
