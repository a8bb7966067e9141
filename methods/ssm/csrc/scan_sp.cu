// Sequence-parallel selective scan (Mamba-1, d_state 16) in CUDA, for long sequences with few channels.
//
// Same algorithm and passes as methods/ssm/triton_scan.py (the reference beside it); what changes is
// how the work maps to threads. A channel's 16 states live in the registers of two lanes (8 each), so
// sums over states are in-thread adds plus one shuffle, and one lane walks a segment of tokens
// serially: the 8 independent recurrences per lane give the instruction-level parallelism, the
// segments give the thread-level parallelism. Every input is fetched one 8-token chunk ahead. What is
// computed per token and not per state (softplus, the gate) the channel's two lanes share (per_token).
// Timings against the Triton scan, and what limits each kernel, are in docs/performance.md and
// docs/gpu_notes.md (session 5).
//
// Geometry. A group of G lanes (G = 12, 16, 24 or 32) holds G/2 channels of one segment of seg_len
// tokens (lane = 2 x channel slot + half). A block holds consecutive segments: a superblock, of 128
// threads where G divides a warp, else (G = 12, 24: Pixel-Mamba's widths are 3 x 2^k channels) of 96,
// whose groups span warps and wait for each other at block barriers; those leave no lane idle at 6, 12
// or 24 channels (methods/ssm/cuda_scan.py's `groups` picks each pass's G). Each pass combines its
// segments' summaries inside the block, so the carry between superblocks (carry_kernel below) scans
// n_seg / (threads / G) entries.
//
// Passes (all state arithmetic in float32):
//   fwd_summary: end state of each segment from a zero start (hseg) and its sum of dt (dtseg); the
//                superblock's summary (sup_h, sup_dt).
//   [carry]      state entering each superblock.
//   fwd_out:     state entering each segment (saved as hstart for the backward), outputs.
//   bwd_summary: forward states at every 8-token chunk start (hck), the segment's adjoint summary
//                W = sum_t exp(A sum_{k<=t} dt_k) C_t dy_t (wseg), and the superblock's (wsup).
//   [carry]      adjoint entering each superblock from the right.
//   bwd_main:    chunks from the last: recompute the chunk's 8 states from hck into shared memory,
//                walk them backwards with the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, and form the
//                gradients. The decays a_t are computed again on the way back: one more ex2 per state
//                costs less than their round trip through shared memory (docs/gpu_notes.md, session 7).
//                dB and dC sum over channels: the lanes of a segment add their terms through shared
//                memory and collect 16 tokens of each row there, so that every write fills a 32-byte
//                sector.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <type_traits>

#include "vec8.cuh"

namespace {

constexpr int kStates = 16;                       // d_state
constexpr int kHalf = 8;                          // states per lane
constexpr int kPair = 2 * kChunk;                 // dB | dC are written 16 tokens (32 bytes of bf16) at a time
constexpr int kStageRow = kChunk * 2 * kStates + 16;  // a segment's [token][B | C] tile, +16 spreads banks
constexpr int kRedRow = 2 * kStates + 4;              // a channel's dB | dC terms of one token, +4 pad

struct Params {
  const void *u, *delta, *z, *dout, *B, *C;
  const float *A, *D, *bias;
  int64_t u_b, u_e, d_b, d_e, z_b, z_e, g_b, g_e, B_b, B_n, C_b, C_n;
  int64_t L, n_ck;
  int E, seg_len, n_seg, n_sup;
  bool has_z, has_d, has_bias, softplus, atomic_bc;
  float *hseg, *dtseg, *sup_h, *sup_dt, *hstart, *hck, *wseg, *wsup;
  const float *carry, *rcarry;
  void *out, *du, *ddelta, *dz, *dBC;  // dBC: (batch, [dB | dC], L), float32 where atomic_bc
  float *dA_part, *dD_part, *dbias_part;
};


// softplus(x) = log1p(exp(x)) with Goldberg's correction where exp(x) is tiny, and its slope sigmoid(x) =
// exp(x) / (1 + exp(x)); above 20 the identity and 1 (as mamba-ssm). Both sides are computed and one is
// selected: a branch here diverges inside a warp.
__device__ __forceinline__ float2 softplus_slope(float x) {
  const float ex = ex2(x * kLog2e);
  const float one_plus = 1.f + ex;
  const float sp = lg2(one_plus) * (ex * rcp(one_plus - 1.f)) * 0.6931471805599453f;
  const bool big = x > 20.f;
  return make_float2(big ? x : (one_plus == 1.f ? ex : sp), big ? 1.f : ex * rcp(one_plus));
}

// ---- where a lane sits ------------------------------------------------------------------------------

template <int G>
struct Lane {
  static constexpr bool kInWarp = 32 % G == 0;       // the group's lanes share a warp (G = 16, 32)
  static constexpr int kThreads = kInWarp ? 128 : 96;  // G = 12, 24: eight or four groups, no idle lane
  static constexpr int CS = G / 2;                   // channel slots per segment
  static constexpr int SB = kThreads / G;            // segments per block (a superblock)
  int seg, slot, half, l, b;
  int64_t e, ec, row, s, t_start, t_end, t_stop;     // ec: e clamped to a real channel (for addresses)
  bool active;
  unsigned mask;                                     // the lanes that shuffle and wait together (__syncwarp)

  // whole_warp: every lane of the block walks to the same chunk, so that a warp never diverges and its
  // shuffles and barriers name the whole warp. A mask known at compile time needs no convergence checks
  // (MATCH / REDUX / VOTE before each): bwd_main, with r formed before the log-decay term, 5.40 -> 5.17 ms
  // a call at 6 x 16.8 M (docs/performance.md, session 11); fwd_out was slower so (1.27 -> 1.41 ms).
  __device__ explicit Lane(const Params& p, bool whole_warp = false) {
    const int tid = threadIdx.x;
    seg = tid / G;
    l = tid % G;
    slot = l >> 1;
    half = l & 1;
    b = blockIdx.z;
    e = int64_t(blockIdx.y) * CS + slot;
    active = e < p.E;
    ec = active ? e : p.E - 1;
    row = int64_t(b) * p.E + ec;
    s = int64_t(blockIdx.x) * SB + seg;
    t_start = s * p.seg_len;
    t_end = s < p.n_seg ? min(t_start + p.seg_len, p.L) : t_start;
    const bool in_group = kInWarp && !whole_warp;
    mask = in_group && G < 32 ? ((1u << G) - 1u) << ((tid & 31) & ~(G - 1)) : 0xffffffffu;
    // where the loop over chunks stops: t_end, or for groups that span warps (their barriers need every
    // thread of the block) and whole_warp the end of the block's first, longest segment. Only the
    // sequence's last segment is shorter; its chunks past the sequence read as zeros and leave every
    // state unchanged.
    const int64_t first = int64_t(blockIdx.x) * SB * p.seg_len;
    t_stop = in_group ? t_end : t_start + (min(first + p.seg_len, p.L) - first + kChunk - 1) / kChunk * kChunk;
  }

  // whether the chunk from t0 holds tokens of this lane's segment
  __device__ bool holds(int64_t t0) const { return t0 < t_end; }

  // the group's lanes wait for each other (shared-memory handoffs); a group across warps, for the block
  __device__ void sync() const {
    if constexpr (kInWarp) __syncwarp(mask);
    else __syncthreads();
  }

  template <typename T>
  __device__ const T* chan_row(const void* base, int64_t sb, int64_t se) const {
    return static_cast<const T*>(base) + b * sb + ec * se;
  }
  template <typename T>
  __device__ T* out_row(void* base, int64_t L) const { return static_cast<T*>(base) + row * L; }
  // this lane's half of the states of entry i in a (rows, n, 16) float32 buffer
  __device__ int64_t state_at(int64_t n, int64_t i) const { return (row * n + i) * kStates + half * kHalf; }
};

constexpr int kHalfChunk = kChunk / 2;

// f over a chunk's 8 tokens, once per channel: each of the channel's two lanes takes 4 of the tokens (half
// h: tokens 4h .. 4h + 3) and they trade the results, a shuffle a value. For the work done per token and
// not per state (softplus and its slope, the gate's sigmoid), which both lanes would otherwise repeat on
// the MUFU (16 operations a clock on a multiprocessor; ncu put fwd_summary's and fwd_out's use of it at
// 67-73% of its peak). At 6 x 16.8 M, bf16: bwd_main 5.02 -> 4.40 ms a call, fwd_out 1.27 -> 1.19,
// fwd_summary 0.75 -> 0.67, bwd_summary 1.47 -> 1.42 (docs/performance.md, session 15). f(i, hi) computes
// token i, or 4 + i where hi, and returns one value (into a) or a float2 (into a and b). a and b may be
// the arrays f reads: token i's entries are read before they are written.
template <int G, typename F>
__device__ __forceinline__ void per_token(const Lane<G>& ln, F f, float a[kChunk], float b[kChunk] = nullptr) {
  const bool hi = ln.half;
  auto trade = [&](float mine, float out[kChunk], int i) {
    const float other = __shfl_xor_sync(ln.mask, mine, 1);
    out[i] = hi ? other : mine;
    out[kHalfChunk + i] = hi ? mine : other;
  };
#pragma unroll
  for (int i = 0; i < kHalfChunk; ++i) {
    const auto r = f(i, hi);
    if constexpr (std::is_same_v<decltype(r), const float2>) {
      trade(r.x, a, i);
      trade(r.y, b, i);
    } else {
      trade(r, a, i);
    }
  }
}

// token i of the lane's 4 (see per_token)
__device__ __forceinline__ float pick(const float v[kChunk], int i, bool hi) { return hi ? v[kHalfChunk + i] : v[i]; }

template <int G>
__device__ void load_A(const Params& p, const Lane<G>& ln, float A[kHalf]) {
#pragma unroll
  for (int j = 0; j < kHalf; ++j) A[j] = p.A[ln.ec * kStates + ln.half * kHalf + j];
}

// A lane's input rows for one pass, resolved once: its channel's rows and its share of the segment's
// B | C rows (row r of 32: B's state r, or C's state r - 16; the group's lanes take rows l, l + G, ...)
template <typename T, int G, int ROWS>
struct Rows {
  static constexpr int kRows = (ROWS + G - 1) / G;
  const T *delta, *u, *z, *dout, *bc[kRows];
  bool aligned;  // every row starts on 16 bytes, so whole chunks load as vectors

  __device__ Rows(const Params& p, const Lane<G>& ln, bool with_dout) {
    delta = ln.template chan_row<T>(p.delta, p.d_b, p.d_e);
    u = ln.template chan_row<T>(p.u, p.u_b, p.u_e);
    z = p.has_z ? ln.template chan_row<T>(p.z, p.z_b, p.z_e) : u;
    dout = with_dout ? ln.template chan_row<T>(p.dout, p.g_b, p.g_e) : u;
    aligned = aligned16(delta) && aligned16(u) && aligned16(z) && aligned16(dout);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = ln.l + i * G;
      bc[i] = r >= ROWS ? u
              : r < kStates ? static_cast<const T*>(p.B) + ln.b * p.B_b + r * p.B_n
                            : static_cast<const T*>(p.C) + ln.b * p.C_b + (r - kStates) * p.C_n;
      aligned = aligned && aligned16(bc[i]);
    }
  }
};

// One chunk's inputs in raw registers: 8 tokens of each of a Rows' rows.
template <typename T, int G, int ROWS>
struct ChunkIn {
  static constexpr int kRows = Rows<T, G, ROWS>::kRows;
  Raw8<T> delta, u, z, dout, bc[kRows];

  // tokens t0 .. t0 + 8 (zero past the end of the sequence)
  __device__ void fetch(const Params& p, const Lane<G>& ln, const Rows<T, G, ROWS>& rows, int64_t t0,
                        bool with_dout) {
    const int n = inside(t0, p.L);
    const bool vec = n == kChunk && rows.aligned;
    delta = fetch8(rows.delta + t0, n, vec);
    u = fetch8(rows.u + t0, n, vec);
    if (p.has_z) z = fetch8(rows.z + t0, n, vec);
    if (with_dout) dout = fetch8(rows.dout + t0, n, vec);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (ln.l + i * G >= ROWS) break;
      bc[i] = fetch8(rows.bc[i] + t0, n, vec);
    }
  }

  // dt (after bias and softplus) and u, zero outside the sequence and on lanes without a channel, so
  // those tokens leave every state unchanged; kSlope: also d dt / d delta (softplus' slope, or 1)
  template <bool kSlope = false>
  __device__ void dt_u(const Params& p, const Lane<G>& ln, int n, float dt[kChunk], float uv[kChunk],
                       float slope[kChunk] = nullptr) const {
    float x[kChunk];
    unpack8(delta, x);
    unpack8(u, uv);
    const float bias = p.has_bias ? p.bias[ln.ec] : 0.f;
#pragma unroll
    for (int t = 0; t < kChunk; ++t) x[t] += bias;
    if (p.softplus) {
      per_token(ln, [&](int i, bool hi) {
        const float2 r = softplus_slope(pick(x, i, hi));
        if constexpr (kSlope) return r;
        else return r.x;
      }, dt, slope);
    } else {
#pragma unroll
      for (int t = 0; t < kChunk; ++t) {
        dt[t] = x[t];
        if constexpr (kSlope) slope[t] = 1.f;
      }
    }
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      const bool in = ln.active && t < n;
      dt[t] = in ? dt[t] : 0.f;
      uv[t] = in ? uv[t] : 0.f;
    }
  }

  // B | C rows into shared memory as [token][row] float32
  __device__ void stage(const Lane<G>& ln, float* tile) const {
    ln.sync();  // the previous chunk's reads are done
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = ln.l + i * G;
      if (r >= ROWS) break;
      float v[kChunk];
      unpack8(bc[i], v);
#pragma unroll
      for (int t = 0; t < kChunk; ++t) tile[t * 2 * kStates + r] = v[t];
    }
    ln.sync();
  }
};

__device__ __forceinline__ void split8(const float4 a, const float4 b, float v[kHalf]) {
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void read8(const float* src, float v[kHalf]) {
  split8(*reinterpret_cast<const float4*>(src), *reinterpret_cast<const float4*>(src + 4), v);
}

// token t's B (part kB) or C (part kC) states of this lane's half, from a ChunkIn::stage tile
constexpr int kB = 0, kC = kStates;
__device__ __forceinline__ void read_staged(const float* tile, int t, int part, int half, float v[kHalf]) {
  read8(&tile[t * 2 * kStates + part + half * kHalf], v);
}

__device__ __forceinline__ void write8(float* dst, const float v[kHalf]) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// Channel slot and state of combine item q (one (slot, state) pair per thread and round).
template <int G>
__device__ __forceinline__ bool combine_item(const Params& p, int q, int& slot, int& n, int64_t& row) {
  slot = q / kStates;
  n = q % kStates;
  const int64_t e = int64_t(blockIdx.y) * Lane<G>::CS + slot;
  row = int64_t(blockIdx.z) * p.E + e;
  return e < p.E;
}

template <int G>
__device__ __forceinline__ int valid_segments(const Params& p) {
  return int(min(int64_t(Lane<G>::SB), int64_t(p.n_seg) - int64_t(blockIdx.x) * Lane<G>::SB));
}

// One state (or adjoint) entry chained across a superblock's segments: X = exp(A dt_i) X + v_i over its
// first nv segments, in token order or, kReverse, backwards. visit(i, X) sees the value entering
// segment i, for each of the block's segments; returns the value leaving the chain.
template <int G, bool kReverse, typename Dt, typename Value, typename Visit>
__device__ __forceinline__ float chain_segments(int nv, float X, float a2, Dt dt, Value v, Visit visit) {
  for (int k = 0; k < Lane<G>::SB; ++k) {
    const int i = kReverse ? Lane<G>::SB - 1 - k : k;
    visit(i, X);
    if (i < nv) X = fmaf(ex2(a2 * dt(i)), X, v(i));
  }
  return X;
}

// ---- forward ----------------------------------------------------------------------------------------

template <typename T, int G>
__global__ void __launch_bounds__(Lane<G>::kThreads) fwd_summary_kernel(Params p) {
  using Ln = Lane<G>;
  __shared__ __align__(16) float stage[Ln::SB][kStageRow];
  __shared__ float seg_h[Ln::SB][Ln::CS][kStates];
  __shared__ float seg_dt[Ln::SB][Ln::CS];
  const Ln ln(p);
  float A[kHalf], h[kHalf] = {}, dtsum = 0.f;
  load_A(p, ln, A);
  const Rows<T, G, kStates> rows(p, ln, false);
  ChunkIn<T, G, kStates> in;
  if (ln.t_stop > ln.t_start) in.fetch(p, ln, rows, ln.t_start, false);
  for (int64_t t0 = ln.t_start; t0 < ln.t_stop; t0 += kChunk) {
    float dt[kChunk], u[kChunk];
    in.dt_u(p, ln, inside(t0, p.L), dt, u);
    in.stage(ln, stage[ln.seg]);
    if (t0 + kChunk < ln.t_stop) in.fetch(p, ln, rows, t0 + kChunk, false);
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float Bt[kHalf];
      read_staged(stage[ln.seg], t, kB, ln.half, Bt);
      const float dtl = dt[t] * kLog2e, dtu = dt[t] * u[t];
#pragma unroll
      for (int j = 0; j < kHalf; ++j) h[j] = fmaf(ex2(dtl * A[j]), h[j], dtu * Bt[j]);
      dtsum += dt[t];
    }
  }
  if (ln.t_end > ln.t_start && ln.active) {
    write8(&p.hseg[ln.state_at(p.n_seg, ln.s)], h);
    if (ln.half == 0) p.dtseg[ln.row * p.n_seg + ln.s] = dtsum;
  }
  write8(&seg_h[ln.seg][ln.slot][ln.half * kHalf], h);
  if (ln.half == 0) seg_dt[ln.seg][ln.slot] = dtsum;
  __syncthreads();
  const int nv = valid_segments<G>(p);
  for (int q = threadIdx.x; q < Ln::CS * kStates; q += Ln::kThreads) {
    int slot, n;
    int64_t row;
    if (!combine_item<G>(p, q, slot, n, row)) continue;
    const float a2 = p.A[(row % p.E) * kStates + n] * kLog2e;
    float S = 0.f;
    const float H = chain_segments<G, false>(
        nv, 0.f, a2, [&](int i) { return seg_dt[i][slot]; }, [&](int i) { return seg_h[i][slot][n]; },
        [&](int i, float) { S += i < nv ? seg_dt[i][slot] : 0.f; });
    p.sup_h[(row * p.n_sup + blockIdx.x) * kStates + n] = H;
    if (n == 0) p.sup_dt[row * p.n_sup + blockIdx.x] = S;
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(Lane<G>::kThreads) fwd_out_kernel(Params p) {
  using Ln = Lane<G>;
  __shared__ __align__(16) float stage[Ln::SB][kStageRow];
  __shared__ __align__(16) float seg_in[Ln::SB][Ln::CS][kStates];
  const int nv = valid_segments<G>(p);
  // state entering each segment: the superblock's carry, then the segments' summaries in order
  for (int q = threadIdx.x; q < Ln::CS * kStates; q += Ln::kThreads) {
    int slot, n;
    int64_t row;
    const bool ok = combine_item<G>(p, q, slot, n, row);
    const int n_ok = ok ? nv : 0;
    const int64_t s0 = row * p.n_seg + int64_t(blockIdx.x) * Ln::SB;  // the block's first segment
    chain_segments<G, false>(
        n_ok, ok ? p.carry[(row * (p.n_sup + 1) + blockIdx.x) * kStates + n] : 0.f,
        ok ? p.A[(row % p.E) * kStates + n] * kLog2e : 0.f, [&](int i) { return p.dtseg[s0 + i]; },
        [&](int i) { return p.hseg[(s0 + i) * kStates + n]; },
        [&](int i, float H) {
          seg_in[i][slot][n] = H;
          if (i < n_ok) p.hstart[(s0 + i) * kStates + n] = H;
        });
  }
  const Ln ln(p);
  const Rows<T, G, 2 * kStates> rows(p, ln, false);
  ChunkIn<T, G, 2 * kStates> in;
  if (ln.t_stop > ln.t_start) in.fetch(p, ln, rows, ln.t_start, false);
  __syncthreads();
  float A[kHalf], h[kHalf];
  load_A(p, ln, A);
  read8(&seg_in[ln.seg][ln.slot][ln.half * kHalf], h);
  const float Dv = p.has_d ? p.D[ln.ec] : 0.f;
  for (int64_t t0 = ln.t_start; t0 < ln.t_stop; t0 += kChunk) {
    const int n = inside(t0, p.L);
    float dt[kChunk], u[kChunk], z[kChunk], y[kChunk];
    in.dt_u(p, ln, n, dt, u);
    if (p.has_z) unpack8(in.z, z);
    in.stage(ln, stage[ln.seg]);
    if (t0 + kChunk < ln.t_stop) in.fetch(p, ln, rows, t0 + kChunk, false);
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float Bt[kHalf], Ct[kHalf];
      read_staged(stage[ln.seg], t, kB, ln.half, Bt);
      read_staged(stage[ln.seg], t, kC, ln.half, Ct);
      const float dtl = dt[t] * kLog2e, dtu = dt[t] * u[t];
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        h[j] = fmaf(ex2(dtl * A[j]), h[j], dtu * Bt[j]);
        acc = fmaf(Ct[j], h[j], acc);
      }
      acc += __shfl_xor_sync(ln.mask, acc, 1);
      y[t] = fmaf(Dv, u[t], acc);
    }
    // the gate and the store, each of the channel's two lanes for 4 of the tokens (as per_token)
    const bool hi = ln.half;
    float o[kHalfChunk];
#pragma unroll
    for (int i = 0; i < kHalfChunk; ++i) {
      o[i] = pick(y, i, hi);
      if (p.has_z) {
        const float zv = pick(z, i, hi);
        o[i] *= zv * sigmoid(zv);
      }
    }
    if (ln.active) store4(ln.template out_row<T>(p.out, p.L) + t0 + hi * kHalfChunk, n - hi * kHalfChunk, o);
  }
}

// ---- backward ---------------------------------------------------------------------------------------

// The gate out = y z sigmoid(z) backwards, for the output's gradient g: the gradient at y, g z s, and
// dz / y, g s (1 + z (1 - s)), with s = sigmoid(z)
__device__ __forceinline__ float2 gate_grads(float g, float z) {
  const float s = sigmoid(z);
  return make_float2(g * z * s, g * s * (1.f + z * (1.f - s)));
}

template <typename T, int G>
__global__ void __launch_bounds__(Lane<G>::kThreads) bwd_summary_kernel(Params p) {
  using Ln = Lane<G>;
  __shared__ __align__(16) float stage[Ln::SB][kStageRow];
  __shared__ __align__(16) float seg_w[Ln::SB][Ln::CS][kStates];
  const Ln ln(p);
  const bool runs = ln.t_end > ln.t_start;
  float A[kHalf], h[kHalf] = {}, P[kHalf], W[kHalf] = {};
  load_A(p, ln, A);
  if (runs && ln.active) read8(&p.hstart[ln.state_at(p.n_seg, ln.s)], h);
#pragma unroll
  for (int j = 0; j < kHalf; ++j) P[j] = 1.f;
  const Rows<T, G, 2 * kStates> rows(p, ln, true);
  ChunkIn<T, G, 2 * kStates> in;
  if (ln.t_stop > ln.t_start) in.fetch(p, ln, rows, ln.t_start, true);
  for (int64_t t0 = ln.t_start; t0 < ln.t_stop; t0 += kChunk) {
    if (ln.active && ln.holds(t0)) write8(&p.hck[ln.state_at(p.n_ck, t0 / kChunk)], h);
    float dt[kChunk], u[kChunk], dy[kChunk], z[kChunk];
    in.dt_u(p, ln, inside(t0, p.L), dt, u);
    unpack8(in.dout, dy);  // the output's gradient, then the gradient at y (before the gate)
    if (p.has_z) {
      unpack8(in.z, z);
      per_token(ln, [&](int i, bool hi) { return gate_grads(pick(dy, i, hi), pick(z, i, hi)).x; }, dy);
    }
    in.stage(ln, stage[ln.seg]);
    if (t0 + kChunk < ln.t_stop) in.fetch(p, ln, rows, t0 + kChunk, true);
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float Bt[kHalf], Ct[kHalf];
      read_staged(stage[ln.seg], t, kB, ln.half, Bt);
      read_staged(stage[ln.seg], t, kC, ln.half, Ct);
      const float dyt = ln.active ? dy[t] : 0.f;
      const float dtl = dt[t] * kLog2e, dtu = dt[t] * u[t];
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        const float a = ex2(dtl * A[j]);
        P[j] *= a;
        W[j] = fmaf(P[j], Ct[j] * dyt, W[j]);
        h[j] = fmaf(a, h[j], dtu * Bt[j]);
      }
    }
  }
  if (runs && ln.active) write8(&p.wseg[ln.state_at(p.n_seg, ln.s)], W);
  write8(&seg_w[ln.seg][ln.slot][ln.half * kHalf], W);
  __syncthreads();
  const int nv = valid_segments<G>(p);
  for (int q = threadIdx.x; q < Ln::CS * kStates; q += Ln::kThreads) {
    int slot, n;
    int64_t row;
    if (!combine_item<G>(p, q, slot, n, row)) continue;
    const int64_t s0 = row * p.n_seg + int64_t(blockIdx.x) * Ln::SB;
    p.wsup[(row * p.n_sup + blockIdx.x) * kStates + n] = chain_segments<G, true>(
        nv, 0.f, p.A[(row % p.E) * kStates + n] * kLog2e, [&](int i) { return p.dtseg[s0 + i]; },
        [&](int i) { return seg_w[i][slot][n]; }, [](int, float) {});
  }
}

#ifndef BWD_MIN_BLOCKS  // at 3 (blocks of 128 or 96 threads), 168 registers a thread would spill
#define BWD_MIN_BLOCKS 2
#endif

// bwd_main's shared memory (dynamic: past the 48 KB of static shared memory)
template <int G>
struct BwdSmem {
  using Ln = Lane<G>;
  float4 hs[kChunk - 1][2][Ln::kThreads];  // the chunk's states h_0..h_6, lane-fastest: no bank conflicts
  float red[2][Ln::SB][Ln::CS][kRedRow];  // dB | dC terms of two tokens (double-buffered)
  float stage[Ln::SB][kStageRow];
  float bc[Ln::SB][2 * kStates][kPair + 1];  // a segment's dB | dC for 16 tokens (+1: banks)
};

// kSlots: the channel slots whose dB | dC terms are summed; fewer than the group's where the channels
// leave the last slots empty (6 channels in group 16's 8: 2 of 16 loads and 4 of 14 adds a token fewer)
template <typename T, int G, int kSlots = Lane<G>::CS>
__global__ void __launch_bounds__(Lane<G>::kThreads, BWD_MIN_BLOCKS) bwd_main_kernel(Params p) {
  using Ln = Lane<G>;
  static_assert(kSlots <= Ln::CS, "kSlots counts the group's channel slots");
  constexpr int kOwn = (2 * kStates + G - 1) / G;  // dB | dC entries each lane sums over the segment's channels
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem<G>& sm = *reinterpret_cast<BwdSmem<G>*>(smem_raw);
  // before and after the walk, hs holds the segments' adjoints and the partial sums
  static_assert(sizeof(sm.hs) >= sizeof(float) * Ln::SB * Ln::CS * kStates, "seg_r must fit in hs");
  auto seg_r = reinterpret_cast<float(*)[Ln::CS][kStates]>(&sm.hs[0][0][0]);
  const int nv = valid_segments<G>(p);
  // adjoint entering each segment from the right: the superblock's carry, then the summaries backwards
  for (int q = threadIdx.x; q < Ln::CS * kStates; q += Ln::kThreads) {
    int slot, n;
    int64_t row;
    const bool ok = combine_item<G>(p, q, slot, n, row);
    const int64_t s0 = row * p.n_seg + int64_t(blockIdx.x) * Ln::SB;
    chain_segments<G, true>(
        ok ? nv : 0, ok ? p.rcarry[(row * (p.n_sup + 1) + blockIdx.x + 1) * kStates + n] : 0.f,
        ok ? p.A[(row % p.E) * kStates + n] * kLog2e : 0.f, [&](int i) { return p.dtseg[s0 + i]; },
        [&](int i) { return p.wseg[(s0 + i) * kStates + n]; },
        [&](int i, float R) { seg_r[i][slot][n] = R; });
  }
  const Ln ln(p, /*whole_warp=*/true);
  const int tid = threadIdx.x;
  const int64_t n_chunks = (ln.t_stop - ln.t_start + kChunk - 1) / kChunk;
  const Rows<T, G, 2 * kStates> rows(p, ln, true);
  // two chunks' inputs: bwd_main issues the next chunk's loads before it unpacks the current one (5.47
  // against 5.57 ms with one buffer, docs/performance.md session 7; the other kernels are faster with one)
  ChunkIn<T, G, 2 * kStates> cur, nxt;
  float4 h0cur[2], h0nxt[2];  // the chunks' checkpoints
  auto fetch = [&](ChunkIn<T, G, 2 * kStates>& in, float4 h0[2], int64_t t0) {
    in.fetch(p, ln, rows, t0, true);
    if (ln.holds(t0)) {
      const float4* src = reinterpret_cast<const float4*>(&p.hck[ln.state_at(p.n_ck, t0 / kChunk)]);
      h0[0] = src[0];
      h0[1] = src[1];
    } else {
      h0[0] = h0[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  if (n_chunks > 0) fetch(cur, h0cur, ln.t_start + (n_chunks - 1) * kChunk);
  __syncthreads();
  float A[kHalf], r[kHalf], dA[kHalf] = {};
  load_A(p, ln, A);
  read8(&seg_r[ln.seg][ln.slot][ln.half * kHalf], r);  // r = a_{t+1} g_{t+1} for the next token t
  __syncthreads();                                      // before hs overwrites seg_r
  const float Dv = p.has_d ? p.D[ln.ec] : 0.f;
  float dD = 0.f, dbias = 0.f;
  // dB | dC entries this lane sums: kOwn consecutive entries of the [B h0 | C h0 | B h1 | C h1] row (at
  // G = 12 and 24 the last lanes own fewer, or none)
  const int own0 = ln.l * kOwn;
  auto owns = [&](int o) { return kOwn * G == 2 * kStates || own0 + o < 2 * kStates; };
  // ... and their rows of dB | dC. The sums are collected in shared memory for 16 tokens and then
  // written in 32-byte pieces: 2-byte writes per token, scattered over 32 rows, cost more than all of
  // this kernel's arithmetic (docs/gpu_notes.md, session 5)
  auto own_out = [&](int o) {
    const int q = own0 + o;
    return ((q % kStates) >= kHalf ? kStates : 0) + (q / kStates) * kHalf + q % kHalf;
  };
  float(*const bc)[kPair + 1] = sm.bc[ln.seg];
  // token t's dB | dC terms of every channel of the segment (read one token late, so that the
  // shared-memory latency hides behind the next token's arithmetic), summed and written
  using Terms = float[kSlots][kOwn];
  auto load_terms = [&](Terms& terms, int buf) {
#pragma unroll
    for (int c = 0; c < kSlots; ++c)
#pragma unroll
      for (int o = 0; o < kOwn; ++o) terms[c][o] = sm.red[buf][ln.seg][c][owns(o) ? own0 + o : 0];
  };
  auto store_terms = [&](Terms& terms, int col) {  // col: the token's place among the 16
    // a tree over the channels: the upper half (rounded down) onto the lower, until one is left
#pragma unroll
    for (int w = kSlots; w > 1; w = (w + 1) / 2)
#pragma unroll
      for (int c = 0; c + (w + 1) / 2 < w; ++c)
#pragma unroll
        for (int o = 0; o < kOwn; ++o) terms[c][o] += terms[c + (w + 1) / 2][o];
#pragma unroll
    for (int o = 0; o < kOwn; ++o)
      if (owns(o)) bc[own_out(o)][col] = terms[0][o];
  };
  // the 16 collected tokens from t: item i of 64 is row i / 2, tokens 8 (i % 2) .. + 8, so that two
  // neighbouring lanes fill one 32-byte sector with one instruction
  auto write_bc = [&](int64_t t) {
    ln.sync();
    for (int i = ln.l; i < 2 * 2 * kStates; i += G) {
      const int r = i / 2, q = i % 2;
      const int64_t t8 = t + q * kChunk;
      float v[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v[j] = bc[r][q * kChunk + j];
      const int64_t row = (int64_t(ln.b) * 2 * kStates + r) * p.L;
      const int n8 = inside(t8, p.L);
      if (p.atomic_bc) {
#pragma unroll
        for (int j = 0; j < kChunk; ++j)
          if (j < n8) atomicAdd(static_cast<float*>(p.dBC) + row + t8 + j, v[j]);
      } else {
        store8(static_cast<T*>(p.dBC) + row + t8, n8, v);
      }
    }
    ln.sync();
  };
  for (int64_t k = n_chunks - 1; k >= 0; --k) {
    const int64_t t0 = ln.t_start + k * kChunk;
    // slope: d dt / d delta, then ddelta; z, then dz. The gate's gradients stay per token in the loop
    // below: precomputed for the chunk by per_token, as fp32 arrays beside the packed bf16 rows, they spill
    // (60 bytes; bwd_main 4.40 -> 5.78 ms a call, session 15)
    float dt[kChunk], slope[kChunk], u[kChunk], g_out[kChunk], z[kChunk], h[kHalf];
    const int n = inside(t0, p.L);
    if (k > 0) fetch(nxt, h0nxt, t0 - kChunk);
    cur.template dt_u<true>(p, ln, n, dt, u, slope);
    unpack8(cur.dout, g_out);
    if (p.has_z) unpack8(cur.z, z);
    cur.stage(ln, sm.stage[ln.seg]);
    // the chunk's states, forward (h_{-1} is the checkpoint)
    split8(h0cur[0], h0cur[1], h);
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float Bt[kHalf], a[kHalf];
      read_staged(sm.stage[ln.seg], t, kB, ln.half, Bt);
      const float dtl = dt[t] * kLog2e, dtu = dt[t] * u[t];
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        a[j] = ex2(dtl * A[j]);
        h[j] = fmaf(a[j], h[j], dtu * Bt[j]);
      }
      if (t < kChunk - 1) {
        sm.hs[t][0][tid] = make_float4(h[0], h[1], h[2], h[3]);
        sm.hs[t][1][tid] = make_float4(h[4], h[5], h[6], h[7]);
      }
    }
    // backwards through the chunk; h holds h_t
#pragma unroll
    for (int t = kChunk - 1; t >= 0; --t) {
      Terms terms_next;  // token t + 1's, loaded before token t's arithmetic
      if (t < kChunk - 1) load_terms(terms_next, (t + 1) & 1);
      float Bt[kHalf], Ct[kHalf], dBt[kHalf], dCt[kHalf], hp[kHalf], a[kHalf];
      read_staged(sm.stage[ln.seg], t, kB, ln.half, Bt);
      read_staged(sm.stage[ln.seg], t, kC, ln.half, Ct);
      split8(t ? sm.hs[t - 1][0][tid] : h0cur[0], t ? sm.hs[t - 1][1][tid] : h0cur[1], hp);
      const float dtl = dt[t] * kLog2e;
#pragma unroll
      for (int j = 0; j < kHalf; ++j) a[j] = ex2(dtl * A[j]);
      const float2 gz = p.has_z ? gate_grads(g_out[t], z[t]) : make_float2(g_out[t], 0.f);  // dy, dz / y
      const float dyt = ln.active ? gz.x : 0.f;
      const float dtu = dt[t] * u[t];
      float dlog = 0.f, gB = 0.f, y = 0.f;  // sums over this lane's states
#pragma unroll
      for (int j = 0; j < kHalf; ++j) {
        const float g = fmaf(Ct[j], dyt, r[j]);
        r[j] = a[j] * g;
        const float term = r[j] * hp[j];  // g_t a_t h_{t-1}: the gradient at log a_t
        dA[j] = fmaf(term, dt[t], dA[j]);
        dlog = fmaf(term, A[j], dlog);
        gB = fmaf(g, Bt[j], gB);
        y = fmaf(Ct[j], h[j], y);
        dBt[j] = g * dtu;
        dCt[j] = h[j] * dyt;
        h[j] = hp[j];
      }
      dlog += __shfl_xor_sync(ln.mask, dlog, 1);
      gB += __shfl_xor_sync(ln.mask, gB, 1);
      y += __shfl_xor_sync(ln.mask, y, 1);
      float ddt = fmaf(gB, u[t], dlog) * slope[t];
      ddt = ln.active && t < n ? ddt : 0.f;
      dbias += ddt;
      dD = fmaf(dyt, u[t], dD);
      if (p.has_z) z[t] = gz.y * fmaf(Dv, u[t], y);  // dz
      u[t] = fmaf(gB, dt[t], Dv * dyt);      // du
      slope[t] = ddt;
      if (t < kChunk - 1) store_terms(terms_next, int(k % 2) * kChunk + t + 1);
      // red[t & 1] was last read for token t + 2 (or the previous chunk's token 0), before the barrier
      // that closed that token: with two buffers one barrier a token suffices
      float* mine = sm.red[t & 1][ln.seg][ln.slot] + ln.half * kStates;
      write8(mine, dBt);
      write8(mine + kHalf, dCt);
      ln.sync();
    }
    {
      Terms first;
      load_terms(first, 0);
      store_terms(first, int(k % 2) * kChunk);
    }
    if (k % 2 == 0) write_bc(t0);  // segments start on multiples of 16 tokens
    if (ln.active) {
      if (ln.half == 0) {
        store8(ln.template out_row<T>(p.du, p.L) + t0, n, u);
        if (p.has_z) store8(ln.template out_row<T>(p.dz, p.L) + t0, n, z);
      } else {
        store8(ln.template out_row<T>(p.ddelta, p.L) + t0, n, slope);
      }
    }
    cur = nxt;
    h0cur[0] = h0nxt[0];
    h0cur[1] = h0nxt[1];
  }
  // per-block partial sums of dA, dD, ddelta_bias (summed over blocks by the caller)
  __syncthreads();
  float* part = &seg_r[0][0][0];
  write8(&seg_r[ln.seg][ln.slot][ln.half * kHalf], dA);
  __syncthreads();
  const int64_t blk = int64_t(blockIdx.z) * p.n_sup + blockIdx.x;
  for (int q = threadIdx.x; q < Ln::CS * kStates; q += Ln::kThreads) {
    int slot, n;
    int64_t row;
    if (!combine_item<G>(p, q, slot, n, row)) continue;
    float acc = 0.f;
    for (int i = 0; i < Ln::SB; ++i) acc += part[(i * Ln::CS + slot) * kStates + n];
    p.dA_part[(blk * p.E + row % p.E) * kStates + n] = acc;
  }
  __syncthreads();
  if (ln.half == 0) {
    seg_r[ln.seg][ln.slot][0] = dD;
    seg_r[ln.seg][ln.slot][1] = dbias;
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot < Ln::CS; slot += Ln::kThreads) {
    const int64_t e = int64_t(blockIdx.y) * Ln::CS + slot;
    if (e >= p.E) continue;
    float sD = 0.f, sb = 0.f;
    for (int i = 0; i < Ln::SB; ++i) {
      sD += seg_r[i][slot][0];
      sb += seg_r[i][slot][1];
    }
    p.dD_part[blk * p.E + e] = sD;
    p.dbias_part[blk * p.E + e] = sb;
  }
}

// ---- carry between superblocks ----------------------------------------------------------------------

constexpr int kCarryThreads = 1024;  // 8,192 superblocks (16.8 M tokens): stretches of 8

// One (row, state) chain of superblock summaries: S_k = a_k S_{k-1} + x_k with a_k = exp(A dtsum_k), in
// superblock order (forward: carry[k + 1] = S_k, carry[0] = 0, the state entering each superblock) or
// backwards (carry[k] = S_k, carry[n] = 0, the adjoint entering superblock k - 1 from the right).
// Each thread composes a stretch of the chain, a block scan of the stretches gives each its entering
// value, and each walks its stretch again writing the carries. (The Triton scan's _carry_kernel runs a
// row's 16 states in one program and walks 8,192 superblocks in 32 serial tiles: 0.09-0.17 ms a call at
// 6 channels x 16.8 M tokens, against 0.03 here: docs/performance.md, session 10.)
template <bool kReverse>
__global__ void __launch_bounds__(kCarryThreads) carry_kernel(const float* summary, const float* dtsum, const float* A,
                                                             float* carry, int E, int n) {
  const int64_t row = blockIdx.x;
  const int state = blockIdx.y;
  const float a2 = A[(row % E) * kStates + state] * kLog2e;
  const int per = (n + kCarryThreads - 1) / kCarryThreads;
  const int k0 = min(n, int(threadIdx.x) * per), k1 = min(n, k0 + per);
  auto entry = [&](int k) { return kReverse ? n - 1 - k : k; };  // the summary of step k of the chain
  auto step = [&](int k, float& a, float& x) {
    const int64_t i = row * n + entry(k);
    a = ex2(a2 * dtsum[i]);
    x = summary[i * kStates + state];
  };
  float P = 1.f, X = 0.f;  // the stretch as one map S -> P S + X
  for (int k = k0; k < k1; ++k) {
    float a, x;
    step(k, a, x);
    X = fmaf(a, X, x);
    P *= a;
  }
  // inclusive scan of the threads' (P, X) in the warp, then over the warps' totals
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const float Pu = __shfl_up_sync(0xffffffffu, P, d), Xu = __shfl_up_sync(0xffffffffu, X, d);
    if (lane >= d) {
      X = fmaf(P, Xu, X);
      P *= Pu;
    }
  }
  __shared__ float warp_P[kCarryThreads / 32], warp_X[kCarryThreads / 32];
  if (lane == 31) {
    warp_P[warp] = P;
    warp_X[warp] = X;
  }
  __syncthreads();
  float S = 0.f;  // the value entering the warp's first stretch, then this thread's
  for (int w = 0; w < warp; ++w) S = fmaf(warp_P[w], S, warp_X[w]);
  const float Pe = __shfl_up_sync(0xffffffffu, P, 1), Xe = __shfl_up_sync(0xffffffffu, X, 1);
  if (lane > 0) S = fmaf(Pe, S, Xe);
  float* out = carry + row * (int64_t(n) + 1) * kStates + state;
  for (int k = k0; k < k1; ++k) {
    float a, x;
    step(k, a, x);
    S = fmaf(a, S, x);
    out[int64_t(kReverse ? entry(k) : entry(k) + 1) * kStates] = S;
  }
  if (threadIdx.x == 0) out[int64_t(kReverse ? n : 0) * kStates] = 0.f;
}

// ---- host -------------------------------------------------------------------------------------------

using Tensors = std::map<std::string, at::Tensor>;

const at::Tensor* find(const Tensors& t, const char* key) {
  auto it = t.find(key);
  return it == t.end() ? nullptr : &it->second;
}

float* f32(const Tensors& t, const char* key) {
  const at::Tensor* x = find(t, key);
  return x ? x->data_ptr<float>() : nullptr;
}

void row_strides(const Tensors& t, const char* key, const void*& ptr, int64_t& sb, int64_t& sr) {
  const at::Tensor* x = find(t, key);
  if (!x) return;
  TORCH_CHECK(x->stride(2) == 1, key, " must have token stride 1");
  ptr = x->data_ptr();
  sb = x->stride(0);
  sr = x->stride(1);
}

void launch_bwd_main(void (*kernel)(Params), int bytes, const Params& p, dim3 grid, int threads, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, threads, bytes, stream>>>(p);
}

template <typename T, int G>
void launch(const std::string& kernel, const Params& p, dim3 grid, cudaStream_t stream) {
  constexpr int threads = Lane<G>::kThreads;
  // methods/ssm/cuda_scan.py restates the segments a block holds (THREADS // group) to size the carries
  TORCH_CHECK(p.n_sup == (p.n_seg + Lane<G>::SB - 1) / Lane<G>::SB, "n_sup ", p.n_sup, " does not fit ", p.n_seg,
              " segments in blocks of ", Lane<G>::SB, " (group ", G, ")");
  if (kernel == "fwd_summary") fwd_summary_kernel<T, G><<<grid, threads, 0, stream>>>(p);
  else if (kernel == "fwd_out") fwd_out_kernel<T, G><<<grid, threads, 0, stream>>>(p);
  else if (kernel == "bwd_summary") bwd_summary_kernel<T, G><<<grid, threads, 0, stream>>>(p);
  else if (kernel == "bwd_main") {
    // channels in group 16's first 6 slots only (the grid's one block row), as at Pixel-Mamba's 6
    if constexpr (G == 16) {
      if (p.E <= 6) return launch_bwd_main(bwd_main_kernel<T, G, 6>, sizeof(BwdSmem<G>), p, grid, threads, stream);
    }
    launch_bwd_main(bwd_main_kernel<T, G>, sizeof(BwdSmem<G>), p, grid, threads, stream);
  }
  else TORCH_CHECK(false, "unknown scan kernel ", kernel);
}

template <typename T>
void launch_group(int group, const std::string& kernel, const Params& p, dim3 grid, cudaStream_t stream) {
  if (group == 12) launch<T, 12>(kernel, p, grid, stream);
  else if (group == 16) launch<T, 16>(kernel, p, grid, stream);
  else if (group == 24) launch<T, 24>(kernel, p, grid, stream);
  else if (group == 32) launch<T, 32>(kernel, p, grid, stream);
  else TORCH_CHECK(false, "group must be 12, 16, 24 or 32, got ", group);
}

}  // namespace

// One entry point for the four kernels: tensors and sizes by name (methods/ssm/cuda_scan.py builds them;
// csrc/bindings.cpp exposes it).
void run(const std::string& kernel, const Tensors& t, const std::map<std::string, int64_t>& n) {
  const at::Tensor& u = t.at("u");
  const c10::cuda::CUDAGuard guard(u.device());
  Params p{};
  row_strides(t, "u", p.u, p.u_b, p.u_e);
  row_strides(t, "delta", p.delta, p.d_b, p.d_e);
  row_strides(t, "z", p.z, p.z_b, p.z_e);
  row_strides(t, "dout", p.dout, p.g_b, p.g_e);
  row_strides(t, "B", p.B, p.B_b, p.B_n);
  row_strides(t, "C", p.C, p.C_b, p.C_n);
  TORCH_CHECK(t.at("A").size(1) == kStates, "the CUDA scan is built for d_state ", kStates);
  p.A = f32(t, "A");
  p.D = f32(t, "D");
  p.bias = f32(t, "bias");
  p.has_z = p.z != nullptr;
  p.has_d = p.D != nullptr;
  p.has_bias = p.bias != nullptr;
  p.softplus = n.at("softplus") != 0;
  p.atomic_bc = n.at("atomic_bc") != 0;
  p.L = u.size(2);
  p.E = int(u.size(1));
  p.seg_len = int(n.at("seg_len"));
  p.n_seg = int(n.at("n_seg"));
  p.n_sup = int(n.at("n_sup"));
  p.n_ck = (p.L + kChunk - 1) / kChunk;
  p.hseg = f32(t, "hseg");
  p.dtseg = f32(t, "dtseg");
  p.sup_h = f32(t, "sup_h");
  p.sup_dt = f32(t, "sup_dt");
  p.hstart = f32(t, "hstart");
  p.hck = f32(t, "hck");
  p.wseg = f32(t, "wseg");
  p.wsup = f32(t, "wsup");
  p.carry = f32(t, "carry");
  p.rcarry = f32(t, "rcarry");
  p.dA_part = f32(t, "dA_part");
  p.dD_part = f32(t, "dD_part");
  p.dbias_part = f32(t, "dbias_part");
  for (auto [key, slot] : {std::pair<const char*, void**>{"out", &p.out}, {"du", &p.du}, {"ddelta", &p.ddelta},
                           {"dz", &p.dz}, {"dBC", &p.dBC}}) {
    const at::Tensor* x = find(t, key);
    if (!x) continue;
    // rows of L tokens, one after the other: contiguous, or a slice of channels of one batch element
    // (the mixer's fused branch writes its gradients into slices of one buffer)
    TORCH_CHECK(x->stride(2) == 1 && x->stride(1) == p.L && (x->size(0) == 1 || x->stride(0) == x->size(1) * p.L),
                key, " must be contiguous, or for batch 1 a slice of whole rows");
    *slot = x->data_ptr();
  }
  const int group = int(n.at("group"));
  const dim3 grid(p.n_sup, int((p.E + group / 2 - 1) / (group / 2)), int(u.size(0)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (u.scalar_type() == at::kFloat) launch_group<float>(group, kernel, p, grid, stream);
  else if (u.scalar_type() == at::kBFloat16) launch_group<__nv_bfloat16>(group, kernel, p, grid, stream);
  else TORCH_CHECK(false, "the CUDA scan runs float32 and bfloat16, got ", u.scalar_type());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The carry between superblocks: summary (rows, n, 16), dtsum (rows, n), A (E, 16) float32 -> carry
// (rows, n + 1, 16), see carry_kernel.
void carry(const at::Tensor& summary, const at::Tensor& dtsum, const at::Tensor& A, at::Tensor& carry, bool reverse) {
  const c10::cuda::CUDAGuard guard(summary.device());
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&summary, &dtsum, &A, &carry})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->is_contiguous(), "the carry takes contiguous float32 tensors");
  const int64_t rows = summary.size(0), n = summary.size(1);
  TORCH_CHECK(summary.size(2) == kStates && A.size(1) == kStates && dtsum.size(0) == rows && dtsum.size(1) == n &&
                  carry.size(0) == rows && carry.size(1) == n + 1 && rows % A.size(0) == 0,
              "carry: shapes do not match");
  const dim3 grid(unsigned(rows), kStates);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto kernel = reverse ? carry_kernel<true> : carry_kernel<false>;
  kernel<<<grid, kCarryThreads, 0, stream>>>(summary.data_ptr<float>(), dtsum.data_ptr<float>(), A.data_ptr<float>(),
                                             carry.data_ptr<float>(), int(A.size(0)), int(n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
