"""The Triton short convolution (causal depthwise conv1d + bias + SiLU) against F.conv1d in float64:
output and the gradients of x, weight and bias, for strided and contiguous inputs, one and five channel
blocks, lengths that are no multiple of the token block, with and without bias.

On CUDA the kernels run on the GPU; on the CPU the same checks run in Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess because the variable is read when the kernels are defined)."""
import pytest
import torch
import torch.nn.functional as F

# (batch, channels, length, strided input, bias, dtype, tolerance)
CASES = [(2, 6, 700, True, True, torch.float32, 1e-5),
         (1, 40, 300, False, False, torch.float32, 1e-5),   # five channel blocks of 8
         (2, 6, 517, True, True, torch.bfloat16, 1e-2)]


def check_conv(device: str, conv=None) -> None:
    """conv: the function under test (default: the Triton one)."""
    from methods.ssm.triton_conv import causal_conv1d_silu_triton

    conv = conv or causal_conv1d_silu_triton
    gen = torch.Generator().manual_seed(0)
    for batch, channels, length, strided, with_bias, dtype, tol in CASES:
        # x as the mixer passes it: a (batch, E, L) view of the first half of in_proj's (batch, L, 2E)
        xz = torch.randn(batch, length, 2 * channels, generator=gen, dtype=torch.float64)
        w64 = torch.randn(channels, 1, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
        b64 = torch.randn(channels, generator=gen, dtype=torch.float64).requires_grad_(True) \
            if with_bias else None
        x64 = xz.transpose(1, 2)[:, :channels].clone().requires_grad_(True)
        ref = F.silu(F.conv1d(F.pad(x64, (3, 0)), w64, b64, groups=channels))

        leaf = xz.to(device, dtype).requires_grad_(True)
        x = leaf.transpose(1, 2)[:, :channels]
        if not strided:
            x = x.contiguous()
        w = w64.detach().float().to(device).requires_grad_(True)
        b = b64.detach().float().to(device).requires_grad_(True) if with_bias else None
        y = conv(x, w, b)
        assert y.dtype == dtype and y.shape == (batch, channels, length) and y.is_contiguous()

        dy = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)
        inputs = [leaf, w] + ([b] if with_bias else [])
        grads = torch.autograd.grad(y, inputs, dy.to(device, dtype))
        ref_grads = torch.autograd.grad(ref, [x64, w64] + ([b64] if with_bias else []), dy)
        got = {"y": y, "dx": grads[0].transpose(1, 2)[:, :channels], "dw": grads[1]}
        want = {"y": ref, "dx": ref_grads[0], "dw": ref_grads[1]}
        if with_bias:
            got["db"], want["db"] = grads[2], ref_grads[2]
        for name in got:
            err = ((got[name].detach().double().cpu() - want[name]).norm() / want[name].norm()).item()
            assert err <= tol, f"{name}: relative error {err:.2e} > {tol} at {(batch, channels, length, dtype)}"
        # the gate half of in_proj's output gets no gradient from the convolution
        assert (grads[0].transpose(1, 2)[:, channels:] == 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_conv_matches_float64_conv1d_on_gpu():
    check_conv("cuda")


def test_conv_matches_float64_conv1d_in_the_triton_interpreter(triton_interpreter):
    triton_interpreter(__file__)


if __name__ == "__main__":
    check_conv("cpu")
