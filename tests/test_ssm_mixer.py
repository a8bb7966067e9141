"""Mamba mixers: wiring checked against an independent slow-path computation, parameter counts, init,
bidirectionality, and MambaMIL's stride-rate reordering."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.ssm import BiMambaMixer, SRMambaMixer, selective_scan_ref, sr_reorder, sr_restore


def expected_params(d, bidirectional=True, N=16):
    E, R = 2 * d, math.ceil(d / 16)
    branch = E * 4 + E + E * (R + 2 * N) + R * E + E + E * N + E
    return 2 * d * E + (2 if bidirectional else 1) * branch + E * d


def mamba_branch(m, x, z, suffix):
    """mamba_ssm's Mamba.forward slow path written out with the naive scan: (batch, E, L) -> (batch, E, L)."""
    conv, x_proj = getattr(m, "conv1d" + suffix), getattr(m, "x_proj" + suffix)
    dt_proj, A_log, D = getattr(m, "dt_proj" + suffix), getattr(m, f"A{suffix}_log"), getattr(m, "D" + suffix)
    length = x.shape[-1]
    x = F.silu(conv(x)[..., :length])  # nn.Conv1d with padding d_conv - 1, cut to L: causal
    x_dbl = x_proj(x.transpose(1, 2))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ dt_proj.weight.T).transpose(1, 2)
    return selective_scan_ref(x, dt, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True)


def test_bimamba_equals_slow_path_forward_and_backward():
    torch.manual_seed(0)
    m = BiMambaMixer(8).double()
    hidden = torch.randn(2, 19, 8, dtype=torch.float64, requires_grad=True)
    out = m(hidden)
    xz = (hidden @ m.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    y = (mamba_branch(m, x, z, "") + mamba_branch(m, x.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
    expected = y.transpose(1, 2) @ m.out_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [hidden, *m.parameters()])
    grads_ref = torch.autograd.grad((expected * w).sum(), [hidden, *m.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-11)


def test_srmamba_equals_slow_path_with_explicit_interleave():
    torch.manual_seed(0)
    rate, length = 3, 11
    m = SRMambaMixer(8, rate=rate).double()
    hidden = torch.randn(2, length, 8, dtype=torch.float64)
    out = m(hidden)
    xz = hidden @ m.in_proj.weight.T  # (batch, L, 2E)
    groups = math.ceil(length / rate)
    padded = torch.cat((xz, xz.new_zeros(2, groups * rate - length, xz.shape[-1])), dim=1)
    order = [k * rate + w for w in range(rate) for k in range(groups)]  # 0, r, 2r, ..., 1, 1 + r, ...
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    x_r, z_r = padded[:, order].transpose(1, 2).chunk(2, dim=1)
    y1 = mamba_branch(m, x, z, "")
    y2_reordered = mamba_branch(m, x_r, z_r, "_b")
    y2 = torch.empty_like(y2_reordered)
    y2[..., order] = y2_reordered
    expected = (y1 + y2[..., :length]).transpose(1, 2) @ m.out_proj.weight.T
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("d", [3, 8, 20, 48])
def test_parameter_counts_match_the_formula(d):
    assert sum(p.numel() for p in BiMambaMixer(d).parameters()) == expected_params(d)
    assert sum(p.numel() for p in BiMambaMixer(d, bidirectional=False).parameters()) == \
        expected_params(d, bidirectional=False)
    assert sum(p.numel() for p in SRMambaMixer(d).parameters()) == expected_params(d)


@pytest.mark.parametrize("mixer", [BiMambaMixer, SRMambaMixer])
def test_shapes_any_length(mixer):
    m = mixer(6)
    for length in (1, 4, 37):
        assert m(torch.randn(3, length, 6)).shape == (3, length, 6)


def test_bidirectional_sees_the_future_and_unidirectional_does_not():
    torch.manual_seed(0)
    hidden = torch.randn(1, 50, 4, requires_grad=True)
    out = BiMambaMixer(4)(hidden)
    (grad,) = torch.autograd.grad(out[0, 0].sum(), hidden)
    assert grad[0, -1].abs().sum() > 0  # position 0 depends on the last token
    out = BiMambaMixer(4, bidirectional=False)(hidden)
    (grad,) = torch.autograd.grad(out[0, 0].sum(), hidden)
    assert grad[0, 1:].abs().sum() == 0  # causal: position 0 sees itself only
    out = SRMambaMixer(4, rate=5)(hidden)
    (grad,) = torch.autograd.grad(out[0, 0].sum(), hidden)
    assert grad[0, 0].abs().sum() > 0 and grad[0, 1:].abs().sum() == 0  # token 0 leads both orders


def test_mamba_init():
    torch.manual_seed(0)
    m = BiMambaMixer(32)
    for suffix in ("", "_b"):
        dt = F.softplus(getattr(m, "dt_proj" + suffix).bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001 and dt.std() > 0
        A_log = getattr(m, f"A{suffix}_log")
        torch.testing.assert_close(A_log, torch.log(torch.arange(1.0, 17.0)).expand(64, 16))
        assert torch.equal(getattr(m, "D" + suffix), torch.ones(64))
        assert A_log._no_weight_decay and getattr(m, "D" + suffix)._no_weight_decay


def test_srmamba_xavier_init_as_mambamil():
    torch.manual_seed(0)
    m = SRMambaMixer(128)
    for name in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"):
        weight = getattr(m, name).weight
        fan_out, fan_in = weight.shape
        assert weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.1), name
    assert torch.equal(m.dt_proj.bias, torch.zeros(256))
    assert SRMambaMixer(128, mambamil_init=False).dt_proj.bias.abs().min() > 0


@pytest.mark.parametrize("length", [1, 2, 7, 10, 23, 31])
@pytest.mark.parametrize("rate", [1, 2, 3, 5, 10])
def test_sr_reorder_restore_exact_inverse(length, rate):
    x = torch.randn(2, length, 3)
    reordered = sr_reorder(x, rate)
    assert reordered.shape == (2, math.ceil(length / rate) * rate, 3)
    assert torch.equal(sr_restore(reordered, rate, length), x)


def test_sr_reorder_order_and_padding():
    x = torch.arange(1, 8).view(1, 7, 1)  # tokens 1..7, L = 7, rate 3 -> padded to 9
    assert sr_reorder(x, 3).flatten().tolist() == [1, 4, 7, 2, 5, 0, 3, 6, 0]


def test_errors():
    with pytest.raises(ValueError, match="rate"):
        SRMambaMixer(8, rate=0)
    with pytest.raises(ValueError, match=r"\(batch, L, 8\)"):
        BiMambaMixer(8)(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="sr_restore"):
        sr_restore(torch.randn(1, 8, 2), 3, 7)
