"""One scan branch of the channel-first Mamba mixer as a single autograd node, as mamba_ssm's
`mamba_inner_fn` does: the short convolution with SiLU, x_proj (dt_proj folded in) and the CUDA
selective scan, from in_proj's output xz = [x | z] to the gated scan output y.

Why: as separate autograd nodes every op returns its gradient as a tensor of its own, and autograd
concatenates the gradients of the pieces split from one tensor (x | z from in_proj, delta | B | C from
x_proj) and adds the two gradients at the convolution's output (the scan's and x_proj's): 1.7 ms of
concatenations and 0.1 ms of adds in a 31 ms mixer step at 6 channels x 16.8 M tokens (H200,
docs/gpu_notes.md, session 8). Here the scan writes ddelta, dB | dC and dz into slices of the two
gradient buffers (directly where a slice is whole rows, as at batch 1; through a copy otherwise), and
the convolution's backward adds the two gradients as it reads them.
"""
from __future__ import annotations

import torch

from methods.ssm import cuda_channel, cuda_scan


class FusedBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, w_proj, A, D, delta_bias):
        inner, state = xz.shape[1] // 2, A.shape[1]
        x, z = xz[:, :inner], xz[:, inner:]
        u, proj = cuda_channel.conv_proj_forward(x, conv_weight, conv_bias, w_proj)
        delta, B, C = proj.split([inner, state, state], dim=1)
        y, _, saved = cuda_scan.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
        ctx.save_for_backward(xz, conv_weight, conv_bias, w_proj, *saved.tensors)
        saved.tensors = None
        ctx.saved = saved
        return y

    @staticmethod
    def backward(ctx, dy):
        xz, conv_weight, conv_bias, w_proj, *scan_tensors = ctx.saved_tensors
        ctx.saved.tensors = tuple(scan_tensors)
        u = scan_tensors[0]
        batch, inner, length = u.shape
        dxz = torch.empty(xz.shape, device=xz.device, dtype=xz.dtype)
        d_proj = torch.empty(batch, w_proj.shape[0], length, device=u.device, dtype=u.dtype)
        du, _, dA, _, _, dD, _, dbias = cuda_scan.scan_backward(
            ctx.saved, dy, ddelta=d_proj[:, :inner], dBC=d_proj[:, inner:], dz=dxz[:, inner:])
        du_proj, dw_proj = cuda_channel.linear_backward(u, w_proj, d_proj, False)
        _, dconv_weight, dconv_bias = cuda_channel.conv_backward(xz[:, :inner], conv_weight, conv_bias, du,
                                                                 du_proj, dx=dxz[:, :inner])
        return dxz, dconv_weight, dconv_bias, dw_proj, dA, dD, dbias


def fused_branch(xz, conv_weight, conv_bias, w_proj, A, D, delta_bias):
    """y = selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus) with u = silu(conv(x)),
    [delta | B | C] = w_proj u, [x | z] = xz; xz (batch, 2E, L) channel-first on CUDA, w_proj
    (E + 2N, E) in xz's dtype, A (E, 16), D and delta_bias (E,) float32. Only where the CUDA scan and
    convolution run the shapes (`backends_gpu.fused_branch_supports`)."""
    return FusedBranch.apply(xz, conv_weight, conv_bias, w_proj, A, D, delta_bias)
