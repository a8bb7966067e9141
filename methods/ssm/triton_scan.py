"""Sequence-parallel selective scan (Mamba-1) in Triton, for long sequences with few channels.

Why hand-written: the stock mamba-ssm kernel walks each (batch, channel) sequence serially in one
thread block, so Pixel-Mamba's first layers (10^7 tokens, 6..96 channels) keep a handful of the GPU's
multiprocessors busy (about 19 GB/s on an H100). No library offers a sequence-parallel Mamba-1 scan.

The recurrence per channel e and state n is linear, h_t = a_t h_{t-1} + b_t with
a_t = exp(dt_t A[e, n]) and b_t = dt_t u_t B_t[n]; the output is y_t = C_t . h_t + D u_t, gated by
silu(z_t). Forward, in three launches:
  1. every segment of the sequence (grid: channel block x segment x batch) computes its end state
     from a zero start, and the sum of its dt (its total decay is exp(A * sum dt));
  2. a short scan over the segment summaries gives the state entering each segment;
  3. every segment re-runs its scan from that state, chunk by chunk (an associative scan inside
     each chunk of BLOCK_L tokens), and writes the outputs.
Backward is the reverse-time adjoint, g_t = C_t dy_t + a_{t+1} g_{t+1}, split the same way:
  1. every segment stores the states at its chunk starts (for step 3) and its local adjoint summary
     r = a_first g_first from a zero end;
  2. a reverse scan over the summaries gives the adjoint entering each segment from the right;
  3. every segment walks its chunks from the last, recomputes h inside the chunk, scans g backwards
     and forms the gradients: da_t = g_t h_{t-1} = g_t (h_t - b_t), db_t = g_t, then the chain rule
     into dt (through softplus), A, B, C, u, D, z and delta_bias.
All state arithmetic is in float32 whatever the input dtype (float32 or bfloat16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from methods.ssm.backends_gpu import triton_interpreting

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)); ex2 is the hardware op

# Launch geometry. BLOCK_L tokens form one chunk (one associative scan); a segment is a whole number
# of chunks, sized so that the grid has about TARGET_PROGRAMS programs (enough to fill 132
# multiprocessors several times over) while the summary scan stays short.
BLOCK_L = 8
NUM_WARPS = 1
TARGET_PROGRAMS = 8192
MAX_STATE = 64


@dataclass(frozen=True)
class ScanGeometry:
    batch: int
    channels: int
    length: int
    d_state: int
    block_e: int
    block_n: int
    block_l: int
    seg_len: int
    n_seg: int

    @property
    def n_eblk(self) -> int:
        return triton.cdiv(self.channels, self.block_e)

    @property
    def n_chunks(self) -> int:
        return self.n_seg * (self.seg_len // self.block_l)


def plan_geometry(batch: int, channels: int, length: int, d_state: int, block_l: int | None = None,
                  target_programs: int | None = None) -> ScanGeometry:
    block_l = block_l or BLOCK_L
    target_programs = target_programs or TARGET_PROGRAMS
    block_n = triton.next_power_of_2(d_state)
    # 8 channels on 8 lanes x 16 states on 4 lanes (x 4 in registers) fill one warp.
    block_e = max(1, min(triton.next_power_of_2(channels), max(1, 128 // block_n)))
    n_eblk = triton.cdiv(channels, block_e)
    segments_wanted = max(1, target_programs // max(1, batch * n_eblk))
    chunks = triton.cdiv(length, block_l)
    chunks_per_seg = max(1, triton.cdiv(chunks, segments_wanted))
    seg_len = chunks_per_seg * block_l
    return ScanGeometry(batch, channels, length, d_state, block_e, block_n, block_l, seg_len,
                        triton.cdiv(length, seg_len))


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # composition of x -> a1 x + b1 (earlier) then x -> a2 x + b2 (later)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with Goldberg's log1p correction (accurate where exp(x) is tiny); identity above 20
    # like mamba-ssm.
    ex = tl.exp(x)
    one_plus = 1.0 + ex
    denom = tl.where(one_plus == 1.0, 1.0, one_plus - 1.0)
    sp = tl.where(one_plus == 1.0, ex, tl.log(one_plus) * ex / denom)
    return tl.where(x <= 20.0, sp, x)


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt after bias and softplus, zero where masked (so padded tokens leave the state unchanged)."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _program_setup(A_ptr, bias_ptr, D_ptr, E, N, BE: tl.constexpr, BN: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr):
    """Channel block of this program; A (times log2 e) as a [BN, BE] state tile, bias and D as [BE]."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    n = tl.arange(0, BN)
    emask = e < E
    nmask = n < N
    state_mask = nmask[:, None] & emask[None, :]
    A = tl.load(A_ptr + e[None, :] * N + n[:, None], mask=state_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BE], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)
    Dv = tl.zeros([BE], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + e, mask=emask, other=0.0).to(tl.float32)
    return e, n, emask, nmask, state_mask, A, bias, Dv


@triton.jit
def _rows(E, N, L, e, n):
    """Offsets of this batch's (channel) rows of u-shaped tensors and (state) rows of B / C, int64."""
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_b * E + e.to(tl.int64)
    return rows, rows * L, (pid_b * N + n.to(tl.int64)) * L


@triton.jit
def _tile_offsets(idx, t, s_b, s_i, s_l):
    """[BL, len(idx)] element offsets of tokens t and rows idx (channels or states) of this batch in a
    strided (batch, rows, L) tensor: inputs keep their own layout (the mixer passes transposed views),
    so no contiguous copy is made."""
    pid_b = tl.program_id(2).to(tl.int64)
    return (pid_b * s_b + idx.to(tl.int64) * s_i)[None, :] + t.to(tl.int64)[:, None] * s_l


@triton.jit
def _state_offsets(rows, slot, n_slots, N, n):
    """[BN, BE] offsets of state `slot` in a (rows, n_slots, N) float32 buffer."""
    return (rows * n_slots + slot)[None, :] * N + n[:, None]


# Tiles are token-major: [BL, BE] per channel, [BL, BN] per state, [BL, BN, BE] per (state, channel).
# With tokens as the leading dimension Triton keeps a thread's tokens in its registers, so the scans
# along tokens run sequentially inside threads, the channels spread over lanes and the reductions over
# states stay mostly inside threads (checked in the SASS: few shuffles, no spills).


@triton.jit
def _fwd_summary_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, hend_ptr, dtsum_ptr,
                        E, N, L, seg_len, n_seg, su_b, su_e, su_l, sd_b, sd_e, sd_l, sB_b, sB_n, sB_l,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        BE: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    """Pass 1: end state of each segment from a zero start, and the segment's sum of dt."""
    e, n, emask, nmask, state_mask, A, bias, _no_d = _program_setup(A_ptr, bias_ptr, bias_ptr, E, N, BE, BN,
                                                                HAS_BIAS, False)
    A2 = A * LOG2E
    rows, row_u, row_B = _rows(E, N, L, e, n)
    pid_s = tl.program_id(1)
    start = pid_s * seg_len
    stop = tl.minimum(start + seg_len, L)
    h = tl.zeros([BN, BE], dtype=tl.float32)
    total = tl.zeros([BE], dtype=tl.float32)
    for c in range(start, stop, BL):
        t = c + tl.arange(0, BL)
        tmask = t < L
        m_el = tmask[:, None] & emask[None, :]
        dt, _raw = _load_dt(delta_ptr, _tile_offsets(e, t, sd_b, sd_e, sd_l), m_el, bias, HAS_BIAS,
                            SOFTPLUS)
        u = tl.load(u_ptr + _tile_offsets(e, t, su_b, su_e, su_l), mask=m_el, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + _tile_offsets(n, t, sB_b, sB_n, sB_l), mask=tmask[:, None] & nmask[None, :],
                     other=0.0).to(tl.float32)
        # end state of the chunk from zero: sum_t exp(A (S - cum_t)) b_t, a sum over tokens
        cum = tl.cumsum(dt, axis=0)
        S = tl.sum(dt, axis=0)
        w = tl.exp2(A2[None, :, :] * (S[None, :] - cum)[:, None, :])
        h = tl.exp2(A2 * S[None, :]) * h + tl.sum(w * (dt * u)[:, None, :] * Bt[:, :, None], axis=0)
        total += S
    tl.store(hend_ptr + _state_offsets(rows, pid_s, n_seg, N, n), h, mask=state_mask)
    tl.store(dtsum_ptr + rows * n_seg + pid_s, total, mask=emask)


@triton.jit
def _carry_kernel(summ_ptr, dtsum_ptr, A_ptr, carry_ptr, E, N, n_seg,
                  REVERSE: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """Pass 2: scan the segment summaries of one (batch, channel) row.

    summ: (rows, n_seg, N), dtsum: (rows, n_seg), carry: (rows, n_seg + 1, N).
    Forward: carry[s] = state entering segment s (carry[0] = 0, carry[n_seg] = final state).
    Reverse: carry[s + 1] = adjoint r entering segment s from the right (carry[n_seg] = 0)."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.program_id(0) % E
    n = tl.arange(0, BN)
    nmask = n < N
    A2 = tl.load(A_ptr + e * N + n, mask=nmask, other=0.0).to(tl.float32) * LOG2E
    zero_row = tl.zeros([BN], dtype=tl.float32)
    if REVERSE:
        tl.store(carry_ptr + (row * (n_seg + 1) + n_seg) * N + n, zero_row, mask=nmask)
    else:
        tl.store(carry_ptr + (row * (n_seg + 1)) * N + n, zero_row, mask=nmask)
    carry = zero_row
    n_tiles = tl.cdiv(n_seg, BS)
    for i in range(0, n_tiles):
        if REVERSE:
            s0 = (n_tiles - 1 - i) * BS
        else:
            s0 = i * BS
        s = s0 + tl.arange(0, BS)
        smask = s < n_seg
        m2 = smask[:, None] & nmask[None, :]
        x = tl.load(summ_ptr + (row * n_seg + s[:, None]) * N + n[None, :], mask=m2, other=0.0)
        S = tl.load(dtsum_ptr + row * n_seg + s, mask=smask, other=0.0)
        a = tl.where(m2, tl.exp2(S[:, None] * A2[None, :]), 1.0)
        acum, hs = tl.associative_scan((a, x), axis=0, combine_fn=_affine_combine, reverse=REVERSE)
        after = hs + acum * carry[None, :]
        if REVERSE:
            tl.store(carry_ptr + (row * (n_seg + 1) + s[:, None]) * N + n[None, :], after, mask=m2)
            carry = tl.sum(tl.where((tl.arange(0, BS) == 0)[:, None], after, 0.0), axis=0)
        else:
            tl.store(carry_ptr + (row * (n_seg + 1) + s[:, None] + 1) * N + n[None, :], after, mask=m2)
            carry = tl.sum(tl.where((tl.arange(0, BS) == BS - 1)[:, None], after, 0.0), axis=0)


@triton.jit
def _fwd_out_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, carry_ptr, out_ptr,
                    E, N, L, seg_len, n_seg, su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    """Pass 3: each segment scans again from its true entering state and writes the outputs."""
    e, n, emask, nmask, state_mask, A, bias, Dv = _program_setup(A_ptr, bias_ptr, D_ptr, E, N, BE, BN,
                                                                 HAS_BIAS, HAS_D)
    A2 = A * LOG2E
    rows, row_u, row_B = _rows(E, N, L, e, n)
    pid_s = tl.program_id(1)
    h = tl.load(carry_ptr + _state_offsets(rows, pid_s, n_seg + 1, N, n), mask=state_mask, other=0.0)
    last = (tl.arange(0, BL) == BL - 1)[:, None, None]
    start = pid_s * seg_len
    stop = tl.minimum(start + seg_len, L)
    for c in range(start, stop, BL):
        t = c + tl.arange(0, BL)
        tmask = t < L
        m_el = tmask[:, None] & emask[None, :]
        m_nl = tmask[:, None] & nmask[None, :]
        offs_out = row_u[None, :] + t[:, None]
        dt, _raw = _load_dt(delta_ptr, _tile_offsets(e, t, sd_b, sd_e, sd_l), m_el, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + _tile_offsets(e, t, su_b, su_e, su_l), mask=m_el, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + _tile_offsets(n, t, sB_b, sB_n, sB_l), mask=m_nl, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + _tile_offsets(n, t, sC_b, sC_n, sC_l), mask=m_nl, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])
        b = (dt * u)[:, None, :] * Bt[:, :, None]
        acum, hs = tl.associative_scan((a, b), axis=0, combine_fn=_affine_combine)
        hfull = hs + acum * h[None, :, :]
        y = tl.sum(hfull * Ct[:, :, None], axis=1) + Dv[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + _tile_offsets(e, t, sz_b, sz_e, sz_l), mask=m_el, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + offs_out, y.to(out_ptr.dtype.element_ty), mask=m_el)
        h = tl.sum(tl.where(last, hfull, 0.0), axis=0)


@triton.jit
def _dy_of(dout_ptr, z_ptr, offs_g, offs_z, m_el, HAS_Z: tl.constexpr):
    """Gradient at y (before the gate) from the gradient at the gated output."""
    dy = tl.load(dout_ptr + offs_g, mask=m_el, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + offs_z, mask=m_el, other=0.0).to(tl.float32)
        dy = dy * z * tl.sigmoid(z)
    return dy


@triton.jit
def _bwd_summary_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, carry_ptr,
                        hchunk_ptr, wsum_ptr, E, N, L, seg_len, n_seg, n_chunks, su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sg_b, sg_e, sg_l, sB_b, sB_n, sB_l,
                        sC_b, sC_n, sC_l,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                        BE: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    """Backward pass 1: store the forward state at every chunk start of the segment, and the
    segment's adjoint summary W = sum_t exp(A * sum_{k=first}^{t} dt_k) C_t dy_t (r from a zero end)."""
    e, n, emask, nmask, state_mask, A, bias, _no_d = _program_setup(A_ptr, bias_ptr, bias_ptr, E, N, BE, BN,
                                                                HAS_BIAS, False)
    A2 = A * LOG2E
    rows, row_u, row_B = _rows(E, N, L, e, n)
    pid_s = tl.program_id(1)
    h = tl.load(carry_ptr + _state_offsets(rows, pid_s, n_seg + 1, N, n), mask=state_mask, other=0.0)
    W = tl.zeros([BN, BE], dtype=tl.float32)
    before = tl.zeros([BE], dtype=tl.float32)  # sum of dt from the segment start to this chunk
    start = pid_s * seg_len
    stop = tl.minimum(start + seg_len, L)
    for c in range(start, stop, BL):
        tl.store(hchunk_ptr + _state_offsets(rows, c // BL, n_chunks, N, n), h, mask=state_mask)
        t = c + tl.arange(0, BL)
        tmask = t < L
        m_el = tmask[:, None] & emask[None, :]
        m_nl = tmask[:, None] & nmask[None, :]
        dt, _raw = _load_dt(delta_ptr, _tile_offsets(e, t, sd_b, sd_e, sd_l), m_el, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + _tile_offsets(e, t, su_b, su_e, su_l), mask=m_el, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + _tile_offsets(n, t, sB_b, sB_n, sB_l), mask=m_nl, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + _tile_offsets(n, t, sC_b, sC_n, sC_l), mask=m_nl, other=0.0).to(tl.float32)
        dy = _dy_of(dout_ptr, z_ptr, _tile_offsets(e, t, sg_b, sg_e, sg_l), _tile_offsets(e, t, sz_b, sz_e, sz_l),
                    m_el, HAS_Z)
        cum = tl.cumsum(dt, axis=0)
        S = tl.sum(dt, axis=0)
        w_end = tl.exp2(A2[None, :, :] * (S[None, :] - cum)[:, None, :])
        h = tl.exp2(A2 * S[None, :]) * h + tl.sum(w_end * (dt * u)[:, None, :] * Bt[:, :, None], axis=0)
        w_start = tl.exp2(A2[None, :, :] * (before[None, :] + cum)[:, None, :])
        W += tl.sum(w_start * dy[:, None, :] * Ct[:, :, None], axis=0)
        before += S
    tl.store(wsum_ptr + _state_offsets(rows, pid_s, n_seg, N, n), W, mask=state_mask)


@triton.jit
def _bwd_main_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                     rcarry_ptr, hchunk_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                     E, N, L, seg_len, n_seg, n_chunks, su_b, su_e, su_l, sd_b, sd_e, sd_l, sz_b, sz_e, sz_l, sg_b, sg_e, sg_l, sB_b, sB_n, sB_l, sC_b, sC_n, sC_l,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr,
                     HAS_Z: tl.constexpr, ATOMIC_BC: tl.constexpr,
                     BE: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    """Backward pass 3: walk the segment's chunks from the last; per chunk recompute h from the
    stored chunk-start state, scan the adjoint g backwards from the carried r, form the gradients.
    dA, dD, ddelta_bias are accumulated per program and summed by the caller."""
    e, n, emask, nmask, state_mask, A, bias, Dv = _program_setup(A_ptr, bias_ptr, D_ptr, E, N, BE, BN,
                                                                 HAS_BIAS, HAS_D)
    A2 = A * LOG2E
    rows, row_u, row_B = _rows(E, N, L, e, n)
    pid_s = tl.program_id(1)
    r = tl.load(rcarry_ptr + _state_offsets(rows, pid_s + 1, n_seg + 1, N, n), mask=state_mask, other=0.0)
    dA_acc = tl.zeros([BN, BE], dtype=tl.float32)
    dD_acc = tl.zeros([BE], dtype=tl.float32)
    dbias_acc = tl.zeros([BE], dtype=tl.float32)
    tpos = tl.arange(0, BL)
    first = (tpos == 0)[:, None, None]
    last = (tpos == BL - 1)[:, None, None]
    start = pid_s * seg_len
    n_ch = tl.cdiv(tl.minimum(seg_len, L - start), BL)
    for i in range(0, n_ch):
        c = start + (n_ch - 1 - i) * BL
        h0 = tl.load(hchunk_ptr + _state_offsets(rows, c // BL, n_chunks, N, n), mask=state_mask, other=0.0)
        t = c + tpos
        tmask = t < L
        m_el = tmask[:, None] & emask[None, :]
        m_nl = tmask[:, None] & nmask[None, :]
        offs_u = row_u[None, :] + t[:, None]      # the gradients are written contiguous
        offs_B = row_B[None, :] + t[:, None]
        offs_d = _tile_offsets(e, t, sd_b, sd_e, sd_l)
        dt, raw = _load_dt(delta_ptr, offs_d, m_el, bias, HAS_BIAS, SOFTPLUS)
        # dt of the next token: a_{t+1} carries the adjoint back (the chunk's last token takes r instead)
        next_mask = ((t + 1) < L)[:, None] & emask[None, :]
        dt_next, _raw_next = _load_dt(delta_ptr, offs_d + sd_l, next_mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + _tile_offsets(e, t, su_b, su_e, su_l), mask=m_el, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + _tile_offsets(n, t, sB_b, sB_n, sB_l), mask=m_nl, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + _tile_offsets(n, t, sC_b, sC_n, sC_l), mask=m_nl, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + _tile_offsets(e, t, sg_b, sg_e, sg_l), mask=m_el, other=0.0).to(tl.float32)
        # forward states inside the chunk
        dtu = dt * u
        b = dtu[:, None, :] * Bt[:, :, None]
        acum, hs = tl.associative_scan((tl.exp2(dt[:, None, :] * A2[None, :, :]), b), axis=0,
                                       combine_fn=_affine_combine)
        h = hs + acum * h0[None, :, :]
        h_prev_decayed = h - b                    # a_t h_{t-1}: keeps b and a out of the registers
        if HAS_Z:
            y = tl.sum(h * Ct[:, :, None], axis=1) + Dv[None, :] * u
            z = tl.load(z_ptr + _tile_offsets(e, t, sz_b, sz_e, sz_l), mask=m_el, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            tl.store(dz_ptr + offs_u, (dout * y * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                     mask=m_el)
            dy = dout * z * sz
        else:
            dy = dout
        dCt = tl.sum(h * dy[:, None, :], axis=2)  # before the adjoint scan, so h is dead during it
        # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, reverse scan, r enters at the chunk's last token
        alpha = tl.where(last, 0.0, tl.exp2(dt_next[:, None, :] * A2[None, :, :]))
        beta = Ct[:, :, None] * dy[:, None, :] + tl.where(last, r[None, :, :], 0.0)
        # reverse scan as flip + forward scan + flip: Triton's reverse=True shuffles between lanes
        # here, while flips of a thread-local axis only rename registers
        _, g = tl.associative_scan((tl.flip(alpha, 0), tl.flip(beta, 0)), axis=0, combine_fn=_affine_combine)
        g = tl.flip(g, 0)
        # r for the previous chunk: a_first g_first, with a_first recomputed from the first token's dt
        dt_first = tl.sum(tl.where((tpos == 0)[:, None], dt, 0.0), axis=0)
        r = tl.exp2(A2 * dt_first[None, :]) * tl.sum(tl.where(first, g, 0.0), axis=0)
        term = g * h_prev_decayed                 # g_t a_t h_{t-1}: the gradient at log a_t
        dA_acc += tl.sum(term * dt[:, None, :], axis=0)
        gB = tl.sum(g * Bt[:, :, None], axis=1)   # [BL, BE]
        ddt = tl.sum(term * A[None, :, :], axis=1) + gB * u
        du = gB * dt + Dv[None, :] * dy
        dD_acc += tl.sum(dy * u, axis=0)
        if SOFTPLUS:
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        ddt = tl.where(m_el, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=0)
        tl.store(du_ptr + offs_u, du.to(du_ptr.dtype.element_ty), mask=m_el)
        tl.store(ddelta_ptr + offs_u, ddt.to(ddelta_ptr.dtype.element_ty), mask=m_el)
        dBt = tl.sum(g * dtu[:, None, :], axis=2)
        if ATOMIC_BC:
            tl.atomic_add(dB_ptr + offs_B, dBt, mask=m_nl, sem="relaxed")
            tl.atomic_add(dC_ptr + offs_B, dCt, mask=m_nl, sem="relaxed")
        else:
            tl.store(dB_ptr + offs_B, dBt.to(dB_ptr.dtype.element_ty), mask=m_nl)
            tl.store(dC_ptr + offs_B, dCt.to(dC_ptr.dtype.element_ty), mask=m_nl)
    prog = (tl.program_id(2).to(tl.int64) * n_seg + pid_s) * E + e.to(tl.int64)  # (batch, n_seg, E, ...)
    tl.store(dA_ptr + prog[None, :] * N + n[:, None], dA_acc, mask=state_mask)
    tl.store(dD_ptr + prog, dD_acc, mask=emask)
    tl.store(dbias_ptr + prog, dbias_acc, mask=emask)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if not u.is_cuda and not triton_interpreting():
        raise ValueError("the sequence-parallel selective scans (Triton, CUDA) run on CUDA tensors; "
                         "use backend='reference' on CPU")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, channels, length), got {tuple(u.shape)} "
                         f"and {tuple(delta.shape)}")
    batch, channels, length = u.shape
    if A.is_complex() or A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be real (channels, d_state) = ({channels}, N), got {tuple(A.shape)} "
                         f"{A.dtype}")
    d_state = A.shape[1]
    if d_state > MAX_STATE:
        raise ValueError(f"the triton scan supports d_state <= {MAX_STATE}, got {d_state}")
    for name, x in (("B", B), ("C", C)):
        if x.shape != (batch, d_state, length):
            raise ValueError(f"{name} must be input-dependent (batch, d_state, length) = "
                             f"({batch}, {d_state}, {length}), got {tuple(x.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None and x.shape != (channels,):
            raise ValueError(f"{name} must be ({channels},), got {tuple(x.shape)}")
    if length >= 2**31:
        raise ValueError(f"sequence length {length} exceeds 2^31 - 1; split the sequence")
    return batch, channels, length, d_state


def _contig(x):
    return None if x is None else x.contiguous()


def _contiguous_like(x):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _dummy(ref):
    return torch.empty(1, device=ref.device, dtype=torch.float32)


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, geo: ScanGeometry):
    rows = geo.batch * geo.channels
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    hend = torch.empty(rows, geo.n_seg, geo.d_state, **f32)
    dtsum = torch.empty(rows, geo.n_seg, **f32)
    carry = torch.empty(rows, geo.n_seg + 1, geo.d_state, **f32)
    out = _contiguous_like(u)
    grid = (geo.n_eblk, geo.n_seg, geo.batch)
    z_arg = z if z is not None else u
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus))
    blocks = dict(BE=geo.block_e, BN=geo.block_n, BL=geo.block_l)
    bias = delta_bias if delta_bias is not None else _dummy(u)
    _fwd_summary_kernel[grid](u, delta, A, B, bias, hend, dtsum, geo.channels, geo.d_state,
                              geo.length, geo.seg_len, geo.n_seg, *u.stride(), *delta.stride(), *B.stride(),
                              **flags, **blocks, num_warps=NUM_WARPS)
    _carry_kernel[(rows,)](hend, dtsum, A, carry, geo.channels, geo.d_state, geo.n_seg,
                           REVERSE=False, BS=_carry_block(geo), BN=geo.block_n)
    _fwd_out_kernel[grid](u, delta, A, B, C, D if D is not None else _dummy(u), z_arg, bias, carry, out,
                          geo.channels, geo.d_state, geo.length, geo.seg_len, geo.n_seg,
                          *u.stride(), *delta.stride(), *z_arg.stride(), *B.stride(), *C.stride(),
                          **flags, HAS_D=D is not None, HAS_Z=z is not None, **blocks,
                          num_warps=NUM_WARPS)
    return out, carry, dtsum


def _carry_block(geo: ScanGeometry) -> int:
    return max(16, min(256, triton.next_power_of_2(geo.n_seg)))


def _backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, carry, dtsum,
              geo: ScanGeometry):
    rows = geo.batch * geo.channels
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    hchunk = torch.empty(rows, geo.n_chunks, geo.d_state, **f32)
    wsum = torch.empty(rows, geo.n_seg, geo.d_state, **f32)
    rcarry = torch.empty(rows, geo.n_seg + 1, geo.d_state, **f32)
    grid = (geo.n_eblk, geo.n_seg, geo.batch)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus))
    blocks = dict(BE=geo.block_e, BN=geo.block_n, BL=geo.block_l)
    bias = delta_bias if delta_bias is not None else _dummy(u)
    z_arg = z if z is not None else u
    strides = (*u.stride(), *delta.stride(), *z_arg.stride(), *dout.stride(), *B.stride(), *C.stride())
    _bwd_summary_kernel[grid](u, delta, A, B, C, z_arg, bias, dout, carry, hchunk, wsum,
                              geo.channels, geo.d_state, geo.length, geo.seg_len, geo.n_seg,
                              geo.n_chunks, *strides, **flags, HAS_Z=z is not None, **blocks,
                              num_warps=NUM_WARPS)
    _carry_kernel[(rows,)](wsum, dtsum, A, rcarry, geo.channels, geo.d_state, geo.n_seg,
                           REVERSE=True, BS=_carry_block(geo), BN=geo.block_n)
    du = _contiguous_like(u)
    ddelta = _contiguous_like(delta)
    dz = _contiguous_like(z) if z is not None else None
    # several channel blocks add into dB / dC, so they accumulate in float32
    atomic = geo.n_eblk > 1
    dB = torch.zeros(B.shape, **f32) if atomic else _contiguous_like(B)
    dC = torch.zeros(C.shape, **f32) if atomic else _contiguous_like(C)
    parts = geo.batch * geo.n_seg
    dA_part = torch.empty(parts, geo.channels, geo.d_state, **f32)
    dD_part = torch.empty(parts, geo.channels, **f32)
    dbias_part = torch.empty(parts, geo.channels, **f32)
    _bwd_main_kernel[grid](u, delta, A, B, C, D if D is not None else _dummy(u), z_arg, bias, dout,
                           rcarry, hchunk, du, ddelta, dz if dz is not None else du, dB, dC,
                           dA_part, dD_part, dbias_part,
                           geo.channels, geo.d_state, geo.length, geo.seg_len, geo.n_seg,
                           geo.n_chunks, *strides, **flags, HAS_D=D is not None, HAS_Z=z is not None,
                           ATOMIC_BC=atomic, **blocks, num_warps=NUM_WARPS)
    dA = dA_part.sum(0).to(A.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias


def scan_outputs(ctx, out, last_state, return_last_state: bool):
    """What a scan's autograd forward returns: out, or (out, last_state) with no gradient through
    last_state (as in mamba-ssm)."""
    if not return_last_state:
        return out
    ctx.mark_non_differentiable(last_state)
    return out, last_state


class TritonSelectiveScan(torch.autograd.Function):
    """mamba_ssm.selective_scan_fn's semantics, sequence-parallel. The last state gets no gradient
    (as in mamba-ssm)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
        batch, channels, length, d_state = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
        # u, delta, z, B, C are read in their own strides (no copies); the small parameters contiguous
        A, D, delta_bias = map(_contig, (A, D, delta_bias))
        geo = plan_geometry(batch, channels, length, d_state)
        out, carry, dtsum = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, geo)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, carry, dtsum)
        ctx.geo, ctx.delta_softplus = geo, delta_softplus
        return scan_outputs(ctx, out, carry[:, geo.n_seg].view(batch, channels, d_state), return_last_state)

    @staticmethod
    def backward(ctx, dout, *unused):
        u, delta, A, B, C, D, z, delta_bias, carry, dtsum = ctx.saved_tensors
        grads = _backward(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                          carry, dtsum, ctx.geo)
        return (*grads, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """Drop-in for mamba_ssm.selective_scan_fn on (batch, channels, length) CUDA tensors with
    input-dependent B, C of shape (batch, d_state, length)."""
    return TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state)
