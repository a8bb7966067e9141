// Token-wise ops of a Mamba mixer over few channels and long sequences, in CUDA: the short causal
// convolution with SiLU (alone, or followed by x_proj in the same kernel at 6 and 12 channels), and the
// linear maps with at most 72 weights (in_proj and out_proj of the narrowest Pixel-Mamba layer).
// Reference implementations beside them: methods/ssm/triton_conv.py and methods/ssm/triton_linear.py
// (and F.conv1d / F.linear on the CPU).
//
// Why not the Triton kernels: their tiles pad 3-12 channels to 16 (tl.dot's smallest side) or 6 to 8,
// and a tile of tokens cannot pass its neighbour the convolution's window, so at 6 channels x 16.8 M
// tokens on an H200 the convolution's backward took 1.12 ms and in_proj's 1.0 ms where their bytes
// need 0.15 (docs/gpu_notes.md, session 8). Here a thread owns whole tokens of every channel (linear
// maps, 8 at a time in the forward where the layouts allow) or 8 consecutive tokens of one row
// (convolution), so nothing is padded and every op is bound by memory.
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "vec8.cuh"

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Sum of v over the block into out (shared memory): every thread passes its values, threads m < M write
// out[m]; read it after a __syncthreads(). Needs blockDim.x a multiple of 32, at most 1024.
template <int M>
__device__ void block_sum(float (&v)[M], float* out) {
  __shared__ float warp_sums[32][M];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v[m] += __shfl_xor_sync(0xffffffffu, v[m], o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
#pragma unroll
    for (int m = 0; m < M; ++m) warp_sums[warp][m] = v[m];
  __syncthreads();
  for (int m = threadIdx.x; m < M; m += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < int(blockDim.x / 32); ++w) s += warp_sums[w][m];
    out[m] = s;
  }
}

// ---- causal depthwise convolution + SiLU ---------------------------------------------------------------
// y[t] = silu(bias + sum_k w[k] x[t - (W - 1) + k]), x zero before token 0. A thread owns 8 tokens of
// one row; the W - 1 tokens of x before them (and, in the backward, of the gradient after them) are
// loaded again by the neighbouring thread: they come from L1.

constexpr int kConvThreads = 128;

struct ConvParams {
  const void *x, *dy, *dy2;
  const float *w, *bias;
  void *y, *dx;
  float *dw_part, *db_part;  // (token blocks, batch x E, W) and (token blocks, batch x E)
  const float* w_proj;       // (N, E): the projection of conv_proj_fwd_kernel
  void* proj;                // its output, contiguous (batch, N, L)
  int64_t L, x_b, x_e, g_b, g_e, g2_b, g2_e, dx_b, dx_e;
  int E;
};

// Output row o of a K-input linear map w (N, K) over 8 tokens held as a [K][8] tile
template <int K>
__device__ __forceinline__ void map_row(const float* w, int o, const float (&x)[K][kChunk], float acc[kChunk]) {
#pragma unroll
  for (int t = 0; t < kChunk; ++t) acc[t] = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int t = 0; t < kChunk; ++t) acc[t] = fmaf(w[o * K + k], x[k][t], acc[t]);
}

template <typename T>
__device__ __forceinline__ float load_or_zero(const T* row, int64_t t, int64_t L) {
  return t >= 0 && t < L ? to_f(row[t]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t t0, int64_t L, float v[kChunk]) {
  const int n = inside(t0, L);
  unpack8(fetch8(row + t0, n, n == kChunk && aligned16(row + t0)), v);
}

template <typename T, int W>
__global__ void __launch_bounds__(kConvThreads) conv_fwd_kernel(ConvParams p) {
  const int b = blockIdx.y / p.E, e = blockIdx.y % p.E;
  const int64_t t0 = (int64_t(blockIdx.x) * kConvThreads + threadIdx.x) * kChunk;
  if (t0 >= p.L) return;
  const T* x = static_cast<const T*>(p.x) + b * p.x_b + e * p.x_e;
  float w[W], xv[kChunk + W - 1];  // xv: x at t0 - (W - 1) ..
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.w[e * W + k];
  const float bias = p.bias ? p.bias[e] : 0.f;
#pragma unroll
  for (int i = 0; i < W - 1; ++i) xv[i] = load_or_zero(x, t0 - (W - 1) + i, p.L);
  load8(x, t0, p.L, xv + W - 1);
  float y[kChunk];
#pragma unroll
  for (int t = 0; t < kChunk; ++t) {
    float pre = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) pre = fmaf(w[k], xv[t + k], pre);
    y[t] = pre * sigmoid(pre);
  }
  store8(static_cast<T*>(p.y) + int64_t(blockIdx.y) * p.L + t0, inside(t0, p.L), y);
}

// The convolution of every channel of 8 tokens, then the projection of the result proj = w_proj u
// (the mixer's x_proj with dt_proj folded in: delta | B | C, N = E + 32 rows) in the same pass, so that
// u is not read back from memory by a second kernel. The projection takes u as stored, rounded to T,
// as a separate map reading it would. u: contiguous (batch, E, L); grid (token blocks, batch).
template <typename T, int E, int N, int W>
__global__ void __launch_bounds__(kConvThreads) conv_proj_fwd_kernel(ConvParams p) {
  __shared__ float wp[N * E];
  for (int i = threadIdx.x; i < N * E; i += kConvThreads) wp[i] = p.w_proj[i];
  __syncthreads();
  const int b = blockIdx.y;
  const int64_t t0 = (int64_t(blockIdx.x) * kConvThreads + threadIdx.x) * kChunk;
  if (t0 >= p.L) return;
  const int n = inside(t0, p.L);
  float u[E][kChunk];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const T* x = static_cast<const T*>(p.x) + b * p.x_b + e * p.x_e;
    float xv[kChunk + W - 1];  // x at t0 - (W - 1) ..
#pragma unroll
    for (int i = 0; i < W - 1; ++i) xv[i] = load_or_zero(x, t0 - (W - 1) + i, p.L);
    load8(x, t0, p.L, xv + W - 1);
    const float bias = p.bias ? p.bias[e] : 0.f;
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) pre = fmaf(p.w[e * W + k], xv[t + k], pre);
      u[e][t] = to_f(from_f<T>(pre * sigmoid(pre)));
    }
    store8(static_cast<T*>(p.y) + (int64_t(b) * E + e) * p.L + t0, n, u[e]);
  }
#pragma unroll 2
  for (int o = 0; o < N; ++o) {
    float acc[kChunk];
    map_row(wp, o, u, acc);
    store8(static_cast<T*>(p.proj) + (int64_t(b) * N + o) * p.L + t0, n, acc);
  }
}

// dx[t] = sum_j w[W - 1 - j] dpre[t + j], dpre = (dy + dy2) silu'(pre); the pre-activations of the
// W - 1 tokens after the thread's 8 are computed again (cheaper than passing them between threads).
// Each block sums dw and dbias over its tokens into its slot of dw_part / db_part.
template <typename T, int W>
__global__ void __launch_bounds__(kConvThreads) conv_bwd_kernel(ConvParams p) {
  constexpr int kOut = kChunk + W - 1;  // tokens whose dpre the thread needs
  const int b = blockIdx.y / p.E, e = blockIdx.y % p.E;
  const int64_t t0 = (int64_t(blockIdx.x) * kConvThreads + threadIdx.x) * kChunk;
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.w[e * W + k];
  const float bias = p.bias ? p.bias[e] : 0.f;
  float sums[W + 1] = {};  // dw[0..W), dbias
  if (t0 < p.L) {
    const T* x = static_cast<const T*>(p.x) + b * p.x_b + e * p.x_e;
    const T* g = static_cast<const T*>(p.dy) + b * p.g_b + e * p.g_e;
    float xv[kOut + W - 1], dpre[kOut];  // xv: x at t0 - (W - 1) ..; dpre at t0 ..
#pragma unroll
    for (int i = 0; i < W - 1; ++i) xv[i] = load_or_zero(x, t0 - (W - 1) + i, p.L);
    load8(x, t0, p.L, xv + W - 1);
#pragma unroll
    for (int i = 0; i < W - 1; ++i) xv[W - 1 + kChunk + i] = load_or_zero(x, t0 + kChunk + i, p.L);
    load8(g, t0, p.L, dpre);
#pragma unroll
    for (int i = 0; i < W - 1; ++i) dpre[kChunk + i] = load_or_zero(g, t0 + kChunk + i, p.L);
    if (p.dy2) {
      const T* g2 = static_cast<const T*>(p.dy2) + b * p.g2_b + e * p.g2_e;
      float v[kChunk];
      load8(g2, t0, p.L, v);
#pragma unroll
      for (int t = 0; t < kChunk; ++t) dpre[t] += v[t];
#pragma unroll
      for (int i = 0; i < W - 1; ++i) dpre[kChunk + i] += load_or_zero(g2, t0 + kChunk + i, p.L);
    }
#pragma unroll
    for (int t = 0; t < kOut; ++t) {  // zero past the end: the gradient is loaded as zero there
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) pre = fmaf(w[k], xv[t + k], pre);
      const float s = sigmoid(pre);
      dpre[t] *= s * fmaf(pre, 1.f - s, 1.f);
    }
    float dx[kChunk];
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < W; ++j) acc = fmaf(w[W - 1 - j], dpre[t + j], acc);
      dx[t] = acc;
#pragma unroll
      for (int k = 0; k < W; ++k) sums[k] = fmaf(dpre[t], xv[t + k], sums[k]);
      sums[W] += dpre[t];
    }
    store8(static_cast<T*>(p.dx) + b * p.dx_b + e * p.dx_e + t0, inside(t0, p.L), dx);
  }
  __shared__ float total[W + 1];
  block_sum<W + 1>(sums, total);
  __syncthreads();
  if (threadIdx.x < W) p.dw_part[(int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * W + threadIdx.x] = total[threadIdx.x];
  if (threadIdx.x == W) p.db_part[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = total[W];
}

// ---- linear maps with few weights ---------------------------------------------------------------------
// y[b, n, t] = sum_k w[n, k] x[b, k, src(t)], src(t) = t or L - 1 - t (Vision Mamba's flipped branch
// reads its input backwards and writes its output backwards at no cost). Any strides: x, y, dy and dx
// may be channel-first or token-major. These kernels take one token at a time and hold all K x N weights
// and, in the backward, the K x N sums of dw in registers; the forward of the mixer's in_proj and
// out_proj layouts runs the 8-token kernels further down instead.

constexpr int kLinThreads = 256;

struct LinParams {
  const void *x, *dy, *dy2;  // dy2: the gradient at a second map of x that reads it backwards, or null
  const void* x2;            // forward, out_proj's layout: a second input read backwards, its map added
  const float* w;            // (N, K)
  void *y, *y2, *dx;         // y2: in_proj's layout, the same map written backwards (y2[L - 1 - t] = y[t])
  float* dw_part;            // (blocks, N, K)
  int64_t L, x_b, x_k, x_t, x2_b, x2_k, y_b, y_n, y_t, y2_b, y2_n, y2_t, dx_b, dx_k, dx_t;
  bool reverse;
};

template <int K, int N>
__device__ __forceinline__ void load_weights(const float* src, float (&w)[N][K]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int k = 0; k < K; ++k) w[n][k] = src[n * K + k];
}

// the M channels of one token (channel stride sc, token offset off)
template <typename T, int M>
__device__ __forceinline__ void load_token(const T* base, int64_t sc, int64_t off, float (&v)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) v[m] = to_f(base[m * sc + off]);
}

template <typename T, int K, int N>
__global__ void __launch_bounds__(kLinThreads) linear_fwd_kernel(LinParams p) {
  float w[N][K];
  load_weights(p.w, w);
  const T* x = static_cast<const T*>(p.x) + blockIdx.y * p.x_b;
  T* y = static_cast<T*>(p.y) + blockIdx.y * p.y_b;
  for (int64_t t = int64_t(blockIdx.x) * kLinThreads + threadIdx.x; t < p.L; t += int64_t(gridDim.x) * kLinThreads) {
    const int64_t src = p.reverse ? p.L - 1 - t : t;
    float xv[K];
    load_token(x, p.x_k, src * p.x_t, xv);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k) acc = fmaf(w[n][k], xv[k], acc);
      y[n * p.y_n + t * p.y_t] = from_f<T>(acc);
    }
  }
}

// dx[b, k, src(t)] = sum_n w[n, k] dy[b, n, t]; dw[n, k] = sum_t dy[b, n, t] x[b, k, src(t)], summed per
// block into dw_part[batch x blockIdx.x]. With dy2, the gradient at the same map of x read the other way
// (Vision Mamba's two in_proj maps) is added in: dy[b, n, t] + dy2[b, n, L - 1 - t]. x and dx are of type
// Tx (float32 where the mixer's input is and its maps run in bf16), dy and dy2 of T.
template <typename T, int K, int N, typename Tx = T>
__global__ void __launch_bounds__(kLinThreads) linear_bwd_kernel(LinParams p) {
  float w[N][K], dw[N * K] = {};
  load_weights(p.w, w);
  const Tx* x = static_cast<const Tx*>(p.x) + blockIdx.y * p.x_b;
  const T* g = static_cast<const T*>(p.dy) + blockIdx.y * p.y_b;
  const T* g2 = p.dy2 ? static_cast<const T*>(p.dy2) + blockIdx.y * p.y2_b : nullptr;
  Tx* dx = static_cast<Tx*>(p.dx) + blockIdx.y * p.dx_b;
  for (int64_t t = int64_t(blockIdx.x) * kLinThreads + threadIdx.x; t < p.L; t += int64_t(gridDim.x) * kLinThreads) {
    const int64_t src = p.reverse ? p.L - 1 - t : t;
    float xv[K], gv[N];
    load_token(x, p.x_k, src * p.x_t, xv);
    load_token(g, p.y_n, t * p.y_t, gv);
    if (g2) {
      float g2v[N];
      load_token(g2, p.y2_n, (p.L - 1 - t) * p.y2_t, g2v);
#pragma unroll
      for (int n = 0; n < N; ++n) gv[n] += g2v[n];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float acc = 0.f;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        acc = fmaf(w[n][k], gv[n], acc);
        dw[n * K + k] = fmaf(gv[n], xv[k], dw[n * K + k]);
      }
      dx[k * p.dx_k + src * p.dx_t] = from_f<Tx>(acc);
    }
  }
  __shared__ float total[N * K];
  block_sum<N * K>(dw, total);
  __syncthreads();
  const int64_t slot = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int i = threadIdx.x; i < N * K; i += kLinThreads) p.dw_part[slot * N * K + i] = total[i];
}

// ---- the forward maps, 8 tokens a thread -------------------------------------------------------------
// Where one side is channel-first (rows of tokens) and the other token-major (the K or N channels of a
// token side by side), as in_proj and out_proj are in the mixer, a thread takes 8 consecutive tokens:
// 16-byte loads and stores instead of one 2-byte access per channel and token. At 6 channels x 16.8 M
// tokens (H200) in_proj 3 -> 12 fell from 0.206 to 0.150 ms and out_proj 6 -> 3 from 0.113 to 0.091.
// The token-major side is held as a [channels][8] tile, the channel-first side is walked one row at a
// time, and the weights sit in shared memory (read as broadcasts, each used for 8 tokens). The same
// layout in the backward (dw sums, dx tile) was no faster than the one-token kernel (0.261 against
// 0.254 ms for in_proj, 0.188 against 0.193 for out_proj): it was left out (docs/performance.md,
// session 10).

// v in place, or reversed where dir < 0. Both branches index with constants: an index chosen at run time
// (v[dir > 0 ? i : 7 - i]) would move the arrays to local memory
__device__ __forceinline__ void orient(int dir, const float f[kChunk], float v[kChunk]) {
  if (dir > 0) {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = f[i];
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = f[kChunk - 1 - i];
  }
}

// chunk positions: token i of the chunk sits at s0 + dir * i (dir -1: read or written backwards)
struct Span {
  int64_t s0;
  int dir, n;  // n: the chunk's tokens inside the sequence
  __device__ int64_t at(int i) const { return s0 + dir * i; }
  __device__ int64_t lowest() const { return dir > 0 ? s0 : s0 - (kChunk - 1); }  // of a whole chunk
  // the same tokens counted from the sequence's other end (token t as L - 1 - t)
  __device__ Span mirrored(int64_t L) const { return Span{L - 1 - s0, -dir, n}; }
};

// 8 tokens of one channel-first row
template <typename T>
__device__ __forceinline__ void load_row(const T* row, Span sp, float v[kChunk]) {
  if (sp.n == kChunk && aligned16(row + sp.lowest())) {
    float f[kChunk];
    unpack8(fetch8(row + sp.lowest(), kChunk, true), f);
    orient(sp.dir, f, v);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) v[i] = i < sp.n ? to_f(row[sp.at(i)]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* row, Span sp, const float v[kChunk]) {
  if (sp.n == kChunk && aligned16(row + sp.lowest())) {
    float f[kChunk];
    orient(sp.dir, v, f);
    store8(row + sp.lowest(), kChunk, f);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (i < sp.n) row[sp.at(i)] = from_f<T>(v[i]);
  }
}

// 8 tokens of a token-major view of M channels (channel stride 1, token stride M)
template <typename T, int M>
__device__ __forceinline__ void load_tile(const T* base, Span sp, float (&v)[M][kChunk]) {
  const T* lo = base + sp.lowest() * M;
  if (sp.n == kChunk && aligned16(lo)) {
    uint4 raw[M * kChunk * sizeof(T) / 16];
#pragma unroll
    for (int w = 0; w < int(M * kChunk * sizeof(T) / 16); ++w) raw[w] = reinterpret_cast<const uint4*>(lo)[w];
    const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float f[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) f[i] = to_f(e[i * M + m]);
      orient(sp.dir, f, v[m]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m) v[m][i] = i < sp.n ? to_f(base[sp.at(i) * M + m]) : 0.f;
  }
}

template <typename T, int M>
__device__ __forceinline__ void store_tile(T* base, Span sp, const float (&v)[M][kChunk]) {
  T* lo = base + sp.lowest() * M;
  if (sp.n == kChunk && aligned16(lo)) {
    uint4 raw[M * kChunk * sizeof(T) / 16];
    T* e = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float f[kChunk];
      orient(sp.dir, v[m], f);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) e[i * M + m] = from_f<T>(f[i]);
    }
#pragma unroll
    for (int w = 0; w < int(M * kChunk * sizeof(T) / 16); ++w) reinterpret_cast<uint4*>(lo)[w] = raw[w];
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (i < sp.n) base[sp.at(i) * M + m] = from_f<T>(v[m][i]);
  }
}

// the block's copy of the (N, K) weights
template <int K, int N>
__device__ __forceinline__ void stage_weights(const float* src, float* w) {
  for (int i = threadIdx.x; i < N * K; i += blockDim.x) w[i] = src[i];
  __syncthreads();
}

// the chunks of 8 tokens of a batch element, grid-stride: sp_t in token order, sp_src at src(t)
template <typename F>
__device__ __forceinline__ void for_chunks(const LinParams& p, F&& f) {
  for (int64_t t0 = (int64_t(blockIdx.x) * kLinThreads + threadIdx.x) * kChunk; t0 < p.L;
       t0 += int64_t(gridDim.x) * kLinThreads * kChunk) {
    const Span sp{t0, 1, inside(t0, p.L)};
    f(sp, p.reverse ? sp.mirrored(p.L) : sp);
  }
}

// in_proj (x token-major, y channel-first; with y2, Vision Mamba's reversed branch gets the same map
// written backwards: x is read once) or, kYTokenMajor, out_proj (x channel-first, y token-major; with x2,
// Vision Mamba's two branches: y[t] = w (x[t] + x2[L - 1 - t]), one pass instead of two maps and a sum);
// x of type Tx (float32 where the mixer's input is and its maps run in bf16), y of T
template <typename T, int K, int N, bool kYTokenMajor, typename Tx = T>
__global__ void __launch_bounds__(kLinThreads) linear8_fwd_kernel(LinParams p) {
  __shared__ float w[N * K];
  stage_weights<K, N>(p.w, w);
  const Tx* x = static_cast<const Tx*>(p.x) + blockIdx.y * p.x_b;
  const Tx* x2 = p.x2 ? static_cast<const Tx*>(p.x2) + blockIdx.y * p.x2_b : nullptr;
  T* y = static_cast<T*>(p.y) + blockIdx.y * p.y_b;
  T* y2 = p.y2 ? static_cast<T*>(p.y2) + blockIdx.y * p.y_b : nullptr;
  for_chunks(p, [&](Span sp_t, Span sp_src) {
    if constexpr (!kYTokenMajor) {  // the x tile, then y row by row
      float xv[K][kChunk];
      load_tile<Tx, K>(x, sp_src, xv);
#pragma unroll
      for (int o = 0; o < N; ++o) {
        float acc[kChunk];
        map_row(w, o, xv, acc);
        store_row(y + o * p.y_n, sp_t, acc);
        if (y2) store_row(y2 + o * p.y_n, sp_t.mirrored(p.L), acc);
      }
    } else {  // x row by row into the y tile
      float yv[N][kChunk] = {};
#pragma unroll
      for (int k = 0; k < K; ++k) {
        float xk[kChunk];
        load_row(x + k * p.x_k, sp_src, xk);
        if (x2) {
          float x2k[kChunk];
          load_row(x2 + k * p.x2_k, sp_t.mirrored(p.L), x2k);
#pragma unroll
          for (int i = 0; i < kChunk; ++i) xk[i] += x2k[i];
        }
#pragma unroll
        for (int o = 0; o < N; ++o)
#pragma unroll
          for (int i = 0; i < kChunk; ++i) yv[o][i] = fmaf(w[o * K + k], xk[i], yv[o][i]);
      }
      store_tile<T, N>(y, sp_t, yv);
    }
  });
}

// ---- host -------------------------------------------------------------------------------------------

cudaStream_t stream_of(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

template <typename F>
void by_dtype(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) f(float{});
  else if (x.scalar_type() == at::kBFloat16) f(__nv_bfloat16{});
  else TORCH_CHECK(false, "the CUDA channel ops run float32 and bfloat16, got ", x.scalar_type());
}

template <typename F>
void by_width(int W, F&& f) {
  if (W == 2) f(std::integral_constant<int, 2>{});
  else if (W == 3) f(std::integral_constant<int, 3>{});
  else if (W == 4) f(std::integral_constant<int, 4>{});
  else TORCH_CHECK(false, "the CUDA convolution is built for widths 2-4, got ", W);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, name, " must be (batch, channels, L) with token stride 1");
}

ConvParams conv_params(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == x.size(1),
              "w must be contiguous float32 (E, width)");
  ConvParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.L = x.size(2);
  p.E = int(x.size(1));
  p.x_b = x.stride(0);
  p.x_e = x.stride(1);
  return p;
}

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y

dim3 conv_grid(const at::Tensor& x) {
  TORCH_CHECK(x.size(0) * x.size(1) <= kMaxGridY, "the CUDA convolution takes batch x channels <= ", kMaxGridY,
              ", got ", x.size(0) * x.size(1), "; use the Triton kernel (methods/ssm/triton_conv.py)");
  const int64_t per_block = int64_t(kConvThreads) * kChunk;
  return dim3(unsigned((x.size(2) + per_block - 1) / per_block), unsigned(x.size(0) * x.size(1)));
}

}  // namespace

// y: contiguous (batch, E, L) of x's dtype
void conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvParams p = conv_params(x, w, bias);
  TORCH_CHECK(y.is_contiguous() && y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "bad y");
  p.y = y.data_ptr();
  by_dtype(x, [&](auto t) {
    by_width(int(w.size(1)), [&](auto W) {
      conv_fwd_kernel<decltype(t), decltype(W)::value><<<conv_grid(x), kConvThreads, 0, stream_of(x)>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (E, N) pairs conv_proj_fwd is compiled for: Pixel-Mamba's 6 and 12 inner channels with d_state 16.
template <typename F>
bool by_proj_shape(int E, int N, F&& f) {
  if (E == 6 && N == 38) f(std::integral_constant<int, 6>{}, std::integral_constant<int, 38>{});
  else if (E == 12 && N == 44) f(std::integral_constant<int, 12>{}, std::integral_constant<int, 44>{});
  else return false;
  return true;
}

bool conv_proj_supports(int64_t E, int64_t N) { return by_proj_shape(int(E), int(N), [](auto, auto) {}); }

// conv_fwd, then proj = w_proj y: w_proj contiguous float32 (N, E), proj contiguous (batch, N, L) of x's dtype
void conv_proj_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   const at::Tensor& w_proj, at::Tensor& proj) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvParams p = conv_params(x, w, bias);
  TORCH_CHECK(y.is_contiguous() && y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type(), "bad y");
  TORCH_CHECK(w_proj.scalar_type() == at::kFloat && w_proj.is_contiguous() && w_proj.dim() == 2 &&
                  w_proj.size(1) == x.size(1),
              "w_proj must be contiguous float32 (N, E)");
  TORCH_CHECK(proj.is_contiguous() && proj.dim() == 3 && proj.size(0) == x.size(0) && proj.size(1) == w_proj.size(0) &&
                  proj.size(2) == x.size(2) && proj.scalar_type() == x.scalar_type(),
              "bad proj");
  TORCH_CHECK(x.size(0) <= kMaxGridY, "conv_proj_fwd takes a batch of at most ", kMaxGridY);
  p.y = y.data_ptr();
  p.w_proj = w_proj.data_ptr<float>();
  p.proj = proj.data_ptr();
  const int64_t per_block = int64_t(kConvThreads) * kChunk;
  const dim3 grid(unsigned((p.L + per_block - 1) / per_block), unsigned(x.size(0)));
  const bool ok = by_proj_shape(p.E, int(w_proj.size(0)), [&](auto e, auto n) {
    by_dtype(x, [&](auto t) {
      by_width(int(w.size(1)), [&](auto W) {
        conv_proj_fwd_kernel<decltype(t), decltype(e)::value, decltype(n)::value, decltype(W)::value>
            <<<grid, kConvThreads, 0, stream_of(x)>>>(p);
      });
    });
  });
  TORCH_CHECK(ok, "conv_proj_fwd is not compiled for ", p.E, " channels and ", w_proj.size(0), " outputs");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dx: (batch, E, L) of x's dtype with token stride 1; dw_part (token blocks, batch x E, W), db_part
// (token blocks, batch x E) float32; the gradient at y is dy (+ dy2)
void conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, const at::Tensor& dy,
              const std::optional<at::Tensor>& dy2, at::Tensor& dx, at::Tensor& dw_part, at::Tensor& db_part) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvParams p = conv_params(x, w, bias);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&dy, &dx}) {
    check_rows(*t, "dy and dx");
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), "dy, dx must match x");
  }
  const dim3 grid = conv_grid(x);
  TORCH_CHECK(dw_part.numel() == int64_t(grid.x) * grid.y * w.size(1) && db_part.numel() == int64_t(grid.x) * grid.y,
              "bad dw_part / db_part");
  p.dy = dy.data_ptr();
  p.g_b = dy.stride(0);
  p.g_e = dy.stride(1);
  if (dy2) {
    check_rows(*dy2, "dy2");
    TORCH_CHECK(dy2->sizes() == x.sizes() && dy2->scalar_type() == x.scalar_type(), "dy2 must match x");
    p.dy2 = dy2->data_ptr();
    p.g2_b = dy2->stride(0);
    p.g2_e = dy2->stride(1);
  }
  p.dx = dx.data_ptr();
  p.dx_b = dx.stride(0);
  p.dx_e = dx.stride(1);
  p.dw_part = dw_part.data_ptr<float>();
  p.db_part = db_part.data_ptr<float>();
  by_dtype(x, [&](auto t) {
    by_width(int(w.size(1)), [&](auto W) {
      conv_bwd_kernel<decltype(t), decltype(W)::value><<<grid, kConvThreads, 0, stream_of(x)>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// The (K, N) shapes compiled: in_proj and out_proj of d_model 3, out_proj of d_model 6 (expand 2). Its
// in_proj, 6 -> 24, would hold 288 floats of weights and sums per thread: it stays on Triton.
template <typename F>
bool by_shape(int K, int N, F&& f) {
  auto is = [&](auto k, auto n) {
    if (K != k.value || N != n.value) return false;
    f(k, n);
    return true;
  };
  using std::integral_constant;
  return is(integral_constant<int, 3>{}, integral_constant<int, 12>{}) ||
         is(integral_constant<int, 6>{}, integral_constant<int, 3>{}) ||
         is(integral_constant<int, 12>{}, integral_constant<int, 6>{});
}

// a view's (channel, token) strides are those of M channels side by side per token
bool token_major(int64_t channel_stride, int64_t token_stride, int M) {
  return channel_stride == 1 && token_stride == M;
}

// x float32 token-major (channel stride 1), y (dy) bfloat16 channel-first: the mixer's in_proj reading
// its float32 input directly (the only layout compiled with two dtypes)
bool mixed_in_proj(const at::Tensor& x, const at::Tensor& y) {
  return x.scalar_type() == at::kFloat && y.scalar_type() == at::kBFloat16 &&
         token_major(x.stride(1), x.stride(2), int(x.size(1))) && y.stride(2) == 1;
}

LinParams lin_params(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y, bool reverse) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2), "x, y: (batch, *, L)");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(0) == y.size(1) && w.size(1) == x.size(1),
              "w must be contiguous float32 (N, K)");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() || mixed_in_proj(x, y),
              "x and y (dy) must share a dtype, or be float32 and bfloat16 in in_proj's layout");
  TORCH_CHECK(x.size(0) <= kMaxGridY, "the CUDA linear maps take a batch of at most ", kMaxGridY);
  LinParams p{};
  p.x = x.data_ptr();
  p.w = w.data_ptr<float>();
  p.L = x.size(2);
  p.x_b = x.stride(0);
  p.x_k = x.stride(1);
  p.x_t = x.stride(2);
  p.y_b = y.stride(0);
  p.y_n = y.stride(1);
  p.y_t = y.stride(2);
  p.reverse = reverse;
  return p;
}

}  // namespace

bool linear_supports(int64_t K, int64_t N) {
  return by_shape(int(K), int(N), [](auto, auto) {});
}

// blocks along the tokens of each batch element (the caller sizes dw_part with it)
int64_t linear_blocks(int64_t L) {
  return std::max<int64_t>(1, std::min<int64_t>((L + kLinThreads - 1) / kLinThreads, 1024));
}

// x2: out_proj's layout only, a second input like x whose map, read backwards, is added (or none);
// y2: in_proj's layout only, a second output like y that gets the map written backwards (or none)
void linear_fwd(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, bool reverse,
                const std::optional<at::Tensor>& x2, const std::optional<at::Tensor>& y2) {
  const c10::cuda::CUDAGuard guard(x.device());
  LinParams p = lin_params(x, w, y, reverse);
  p.y = y.data_ptr();
  if (y2) {
    TORCH_CHECK(y2->sizes() == y.sizes() && y2->strides() == y.strides() && y2->scalar_type() == y.scalar_type() &&
                    y.stride(2) == 1 && token_major(p.x_k, p.x_t, int(x.size(1))) && !reverse && !x2,
                "y2 takes token-major x, channel-first y and y2 of one shape, strides and dtype, and no reverse");
    p.y2 = y2->data_ptr();
  }
  if (x2) {
    TORCH_CHECK(x2->sizes() == x.sizes() && x2->scalar_type() == x.scalar_type() && x2->stride(2) == 1 &&
                    x.stride(2) == 1 && !reverse && token_major(p.y_n, p.y_t, int(y.size(1))),
                "x2 takes channel-first x and x2 of one shape and dtype, a token-major y and no reverse");
    p.x2 = x2->data_ptr();
    p.x2_b = x2->stride(0);
    p.x2_k = x2->stride(1);
  }
  const dim3 grid(unsigned(linear_blocks(p.L)), unsigned(x.size(0)));
  // the 8-token kernels need an eighth of the blocks; below the cap, more would only stage weights
  const dim3 grid8(unsigned(linear_blocks((p.L + kChunk - 1) / kChunk)), grid.y);
  const bool ok = by_shape(int(w.size(1)), int(w.size(0)), [&](auto k, auto n) {
    constexpr int K = decltype(k)::value, N = decltype(n)::value;
    if (x.scalar_type() != y.scalar_type()) {  // lin_params let only in_proj's layout through
      linear8_fwd_kernel<__nv_bfloat16, K, N, false, float><<<grid8, kLinThreads, 0, stream_of(x)>>>(p);
      return;
    }
    by_dtype(x, [&](auto t) {
      using T = decltype(t);
      if (p.y_t == 1 && token_major(p.x_k, p.x_t, K))
        linear8_fwd_kernel<T, K, N, false><<<grid8, kLinThreads, 0, stream_of(x)>>>(p);
      else if (p.x_t == 1 && token_major(p.y_n, p.y_t, N))
        linear8_fwd_kernel<T, K, N, true><<<grid8, kLinThreads, 0, stream_of(x)>>>(p);
      else
        linear_fwd_kernel<T, K, N><<<grid, kLinThreads, 0, stream_of(x)>>>(p);
    });
  });
  TORCH_CHECK(ok, "no CUDA linear map compiled for ", w.size(1), " -> ", w.size(0), " channels");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dy2: the gradient at a second output of the same map reading x the other way, added in (or none)
void linear_bwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy, at::Tensor& dx, at::Tensor& dw_part,
                bool reverse, const std::optional<at::Tensor>& dy2) {
  const c10::cuda::CUDAGuard guard(x.device());
  LinParams p = lin_params(x, w, dy, reverse);
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(), "dx must match x");
  p.dy = dy.data_ptr();
  if (dy2) {
    TORCH_CHECK(dy2->sizes() == dy.sizes() && dy2->scalar_type() == dy.scalar_type(), "dy2 must match dy");
    p.dy2 = dy2->data_ptr();
    p.y2_b = dy2->stride(0);
    p.y2_n = dy2->stride(1);
    p.y2_t = dy2->stride(2);
  }
  p.dx = dx.data_ptr();
  p.dx_b = dx.stride(0);
  p.dx_k = dx.stride(1);
  p.dx_t = dx.stride(2);
  p.dw_part = dw_part.data_ptr<float>();
  const dim3 grid(unsigned(linear_blocks(p.L)), unsigned(x.size(0)));
  TORCH_CHECK(dw_part.scalar_type() == at::kFloat && dw_part.numel() == int64_t(grid.x) * grid.y * w.numel(),
              "bad dw_part");
  const bool ok = by_shape(int(w.size(1)), int(w.size(0)), [&](auto k, auto n) {
    constexpr int K = decltype(k)::value, N = decltype(n)::value;
    if (x.scalar_type() != dy.scalar_type()) {  // in_proj's layout, float32 x and dx, bf16 dy
      linear_bwd_kernel<__nv_bfloat16, K, N, float><<<grid, kLinThreads, 0, stream_of(x)>>>(p);
      return;
    }
    by_dtype(x, [&](auto t) { linear_bwd_kernel<decltype(t), K, N><<<grid, kLinThreads, 0, stream_of(x)>>>(p); });
  });
  TORCH_CHECK(ok, "no CUDA linear map compiled for ", w.size(1), " -> ", w.size(0), " channels");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
