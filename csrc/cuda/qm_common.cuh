// Device code shared by the qmerge CUDA kernels (kernels.cuh and the qm_*.cuh it includes):
// element types, 16-byte loads, scales, task ids. Under NVRTC it includes no header, so nvcc
// (qmerge._C_cuda) and NVRTC (the CuPy fallback) compile the same text.
//
// Every kernel reads activations and weights in their dtype, accumulates in fp32, and rounds once
// when it writes an output of the activation dtype. bf16 and fp16 values travel as raw 16-bit
// words; the conversions are written out (bf16) or one PTX instruction (fp16).
#pragma once

#ifndef __CUDACC_RTC__
#include <cstdio>  // printf (NVRTC declares it itself)
#endif

typedef unsigned char qm_u8;
typedef unsigned short qm_u16;
typedef unsigned int qm_u32;
typedef long long qm_i64;

struct alignas(16) qm_v16 {  // one 16-byte load or store
  qm_u32 a, b, c, d;
};

// --- element types ------------------------------------------------------------------------------

struct QmF32 {
  typedef float T;
  static constexpr int kPerV16 = 4;
  static __device__ __forceinline__ float load(T v) { return v; }
  static __device__ __forceinline__ T store(float v) { return v; }
};

struct QmBF16 {
  typedef qm_u16 T;
  static constexpr int kPerV16 = 8;
  static constexpr qm_u32 kOnePair = 0x3F803F80u;  // (+1, +1); the sign bits are 15 and 31
  static __device__ __forceinline__ float load(T v) { return __uint_as_float(qm_u32(v) << 16); }
  static __device__ __forceinline__ T store(float v) {  // round to nearest even, as torch
    qm_u32 u = __float_as_uint(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return qm_u16(0x7FC0);  // NaN
    u += 0x7FFFu + ((u >> 16) & 1u);
    return qm_u16(u >> 16);
  }
};

struct QmF16 {
  typedef qm_u16 T;
  static constexpr int kPerV16 = 8;
  static constexpr qm_u32 kOnePair = 0x3C003C00u;
  static __device__ __forceinline__ float load(T v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ T store(float v) {
    qm_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
  }
};

// 8 values in 16-byte words: one word (bf16/fp16) or two (fp32).
template <class D>
struct QmRaw8 {
  qm_v16 v[8 / D::kPerV16];
};

template <class D>
__device__ __forceinline__ QmRaw8<D> qm_load_raw8(const typename D::T* p) {
  const qm_v16* q = reinterpret_cast<const qm_v16*>(p);
  QmRaw8<D> r;
#pragma unroll
  for (int h = 0; h < 8 / D::kPerV16; ++h) r.v[h] = q[h];
  return r;
}

template <class D>
__device__ __forceinline__ void qm_unpack8(const QmRaw8<D>& r, float v[8]) {
#pragma unroll
  for (int h = 0; h < 8 / D::kPerV16; ++h) {
    const typename D::T* e = reinterpret_cast<const typename D::T*>(&r.v[h]);
#pragma unroll
    for (int j = 0; j < D::kPerV16; ++j) v[h * D::kPerV16 + j] = D::load(e[j]);
  }
}

// 8 consecutive values p[c0 .. c0+8) as fp32; columns at or past `in` read as 0. `vec`: p is
// 16-byte aligned and the chunk is whole, so it is one (bf16/fp16) or two (fp32) 16-byte loads.
template <class D>
__device__ __forceinline__ void qm_load8(const typename D::T* p, qm_i64 c0, qm_i64 in, bool vec,
                                         float v[8]) {
  if (vec) {
    qm_unpack8<D>(qm_load_raw8<D>(p + c0), v);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = c0 + j < in ? D::load(p[c0 + j]) : 0.0f;
  }
}

template <class D>
__device__ __forceinline__ void qm_store8(typename D::T* p, qm_i64 c0, qm_i64 in, bool vec,
                                          const float v[8]) {
  if (vec) {
    qm_v16* q = reinterpret_cast<qm_v16*>(p + c0);
#pragma unroll
    for (int h = 0; h < 8 / D::kPerV16; ++h) {
      qm_v16 w;
      typename D::T* e = reinterpret_cast<typename D::T*>(&w);
#pragma unroll
      for (int j = 0; j < D::kPerV16; ++j) e[j] = D::store(v[h * D::kPerV16 + j]);
      q[h] = w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (c0 + j < in) p[c0 + j] = D::store(v[j]);
    }
  }
}

// The scale of each of the 8 columns c0.. of one task row: srow [G] fp32, group size gs.
__device__ __forceinline__ void qm_scales8(const float* srow, int groups, qm_i64 gs, qm_i64 c0,
                                           float s[8]) {
  if (groups == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j] = srow[0];
    return;
  }
  qm_i64 g = c0 / gs;
  qm_i64 end = (g + 1) * gs;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    while (c0 + j >= end && g + 1 < groups) {  // gs < 8 can cross several groups in a chunk
      ++g;
      end += gs;
    }
    s[j] = srow[g];
  }
}

// A task id out of range cannot be reported from the host without a device sync: like torch's
// own indexing kernels, the kernel stops with a device-side error that names the op.
__device__ __forceinline__ void qm_bad_task(const char* op, qm_i64 n, qm_i64 id, int tasks) {
  printf("qmerge.%s: 'task_ids'[%lld] = %lld is out of range: expected -1 (no task) or 0..%d\n", op,
         n, id, tasks - 1);
  __trap();
}

__device__ __forceinline__ int qm_task_id(const void* ids, int ids64, qm_i64 n, int tasks,
                                          const char* op) {
  const qm_i64 id = ids64 ? static_cast<const qm_i64*>(ids)[n] : static_cast<const int*>(ids)[n];
  if (id < -1 || id >= tasks) qm_bad_task(op, n, id, tasks);
  return int(id);
}

__device__ __forceinline__ float qm_warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, m);
  return v;
}
