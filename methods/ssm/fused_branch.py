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
from methods.ssm.mixer import fold_x_proj


class FusedBranch(torch.autograd.Function):
    """The branch's weights are prepared here too (x_proj with dt_proj folded in, A = -exp(A_log)), not as
    autograd ops of their own under autocast: at the start of the mixer's forward the GPU waits for the
    CPU to reach the first branch's kernels (docs/gpu_notes.md, session 14: ~0.2 ms of a 22 ms step)."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias):
        inner, state = xz.shape[1] // 2, A_log.shape[1]
        w_proj = fold_x_proj(x_proj_weight, dt_proj_weight, xz.dtype)
        A = -torch.exp(A_log.float())
        x, z = xz[:, :inner], xz[:, inner:]
        u, proj = cuda_channel.conv_proj_forward(x, conv_weight, conv_bias, w_proj)
        delta, B, C = proj.split([inner, state, state], dim=1)
        y, _, saved = cuda_scan.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
        ctx.save_for_backward(xz, conv_weight, conv_bias, w_proj, x_proj_weight, dt_proj_weight,
                              *saved.tensors)
        saved.tensors = None
        ctx.saved = saved
        ctx.A_log_dtype = A_log.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xz, conv_weight, conv_bias, w_proj, x_proj_weight, dt_proj_weight, *scan_tensors = ctx.saved_tensors
        ctx.saved.tensors = tuple(scan_tensors)
        u, A = scan_tensors[0], scan_tensors[2]
        batch, inner, length = u.shape
        dxz = torch.empty(xz.shape, device=xz.device, dtype=xz.dtype)
        d_proj = torch.empty(batch, w_proj.shape[0], length, device=u.device, dtype=u.dtype)
        du, _, dA, _, _, dD, _, dbias = cuda_scan.scan_backward(
            ctx.saved, dy, ddelta=d_proj[:, :inner], dBC=d_proj[:, inner:], dz=dxz[:, inner:])
        du_proj, dw_proj = cuda_channel.linear_backward(u, w_proj, d_proj, False)
        _, dconv_weight, dconv_bias = cuda_channel.conv_backward(xz[:, :inner], conv_weight, conv_bias, du,
                                                                 du_proj, dx=dxz[:, :inner])
        dx_proj, ddt_proj = _fold_backward(dw_proj, x_proj_weight, dt_proj_weight)
        return dxz, dconv_weight, dconv_bias, dx_proj, ddt_proj, (dA * A).to(ctx.A_log_dtype), dD, dbias


def _fold_backward(d_fold, x_proj_weight, dt_proj_weight):
    """Gradients at x_proj's and dt_proj's weights of `fold_x_proj`'s [W_dt W_x[:R]; W_x[R:]], taken in
    float32 or wider."""
    inner, rank = dt_proj_weight.shape
    acc = torch.promote_types(d_fold.dtype, torch.float32)
    d_fold = d_fold.to(acc)
    d_delta = d_fold[:inner]
    d_x = torch.cat((dt_proj_weight.to(acc).t() @ d_delta, d_fold[inner:]))
    d_dt = d_delta @ x_proj_weight[:rank].to(acc).t()
    return d_x.to(x_proj_weight.dtype), d_dt.to(dt_proj_weight.dtype)


def fused_branch(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias):
    """y = selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus) with u = silu(conv(x)),
    [delta | B | C] = `fold_x_proj`(x_proj_weight, dt_proj_weight) u in xz's dtype, A = -exp(A_log),
    [x | z] = xz; xz (batch, 2E, L) channel-first on CUDA, the rest the mixer's parameters as they are.
    Only where the CUDA scan and convolution run the shapes (`backends_gpu.fused_branch_supports`)."""
    return FusedBranch.apply(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias)
