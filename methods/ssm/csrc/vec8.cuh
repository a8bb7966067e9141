// Helpers shared by the CUDA kernels of methods/ssm (scan_sp.cu, channel_ops.cu): the MUFU
// approximations and 8-token row accesses (fp32 arithmetic on float / bfloat16 rows).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace {

constexpr int kChunk = 8;                         // tokens per vector load (16 bytes of bf16)
constexpr float kLog2e = 1.4426950408889634f;

// The MUFU approximations with denormals flushed to zero (.ftz): without it every call also scales its
// argument in and out of the denormal range, a few instructions each, for values under 1e-38
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sigmoid(float x) { return rcp(1.f + ex2(-x * kLog2e)); }

// ---- 8 tokens of one row ------------------------------------------------------------------------------
// Loads are issued one chunk ahead (fetch into raw registers, unpack when the chunk is processed): a
// lane walks its segment serially, so without that every chunk would wait out a global load.

template <typename T>
struct Raw8 {
  uint4 v[sizeof(T) / 2];  // 8 tokens: 16 bytes of bf16, 32 of float
};

// A chunk's tokens inside the sequence: n of the 8 from t0 (n <= 0 past the end)
__device__ __forceinline__ int inside(int64_t t0, int64_t L) { return int(min(int64_t(kChunk), L - t0)); }

__device__ __forceinline__ bool aligned16(const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; }

// 8 tokens from q, of which the first n are inside the sequence (the rest read as zero); vec: all 8 are
// and q is 16-byte aligned, so one vector access does
template <typename T>
__device__ __forceinline__ Raw8<T> fetch8(const T* q, int n, bool vec) {
  Raw8<T> r;
  if (vec) {
#pragma unroll
    for (int w = 0; w < int(sizeof(T) / 2); ++w) r.v[w] = reinterpret_cast<const uint4*>(q)[w];
  } else {
#pragma unroll
    for (int w = 0; w < int(sizeof(T) / 2); ++w) r.v[w] = make_uint4(0, 0, 0, 0);
    T* e = reinterpret_cast<T*>(r.v);
#pragma unroll
    for (int t = 0; t < kChunk; ++t)
      if (t < n) e[t] = q[t];
  }
  return r;
}

__device__ __forceinline__ void unpack8(const Raw8<float>& r, float v[kChunk]) {
  const float* f = reinterpret_cast<const float*>(r.v);
#pragma unroll
  for (int t = 0; t < kChunk; ++t) v[t] = f[t];
}

__device__ __forceinline__ void unpack8(const Raw8<__nv_bfloat16>& r, float v[kChunk]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(r.v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// the first n of 8 tokens to q (n <= 0: none)
__device__ __forceinline__ void store8(float* q, int n, const float v[kChunk]) {
  if (n == kChunk && aligned16(q)) {
    *reinterpret_cast<float4*>(q) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(q + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int t = 0; t < kChunk; ++t)
      if (t < n) q[t] = v[t];
  }
}

__device__ __forceinline__ void store8(__nv_bfloat16* q, int n, const float v[kChunk]) {
  if (n == kChunk && aligned16(q)) {
    uint4 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(q) = r;
  } else {
#pragma unroll
    for (int t = 0; t < kChunk; ++t)
      if (t < n) q[t] = __float2bfloat16(v[t]);
  }
}

// the first min(n, 4) of 4 tokens to q (none where n <= 0)
__device__ __forceinline__ void store4(float* q, int n, const float v[4]) {
  if (n >= 4 && aligned16(q)) {
    *reinterpret_cast<float4*>(q) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (t < n) q[t] = v[t];
  }
}

__device__ __forceinline__ void store4(__nv_bfloat16* q, int n, const float v[4]) {
  if (n >= 4 && (reinterpret_cast<uintptr_t>(q) & 7) == 0) {
    uint2 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
    h[0] = __floats2bfloat162_rn(v[0], v[1]);
    h[1] = __floats2bfloat162_rn(v[2], v[3]);
    *reinterpret_cast<uint2*>(q) = r;
  } else {
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (t < n) q[t] = __float2bfloat16(v[t]);
  }
}

}  // namespace
