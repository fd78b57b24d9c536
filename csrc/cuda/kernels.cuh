// Device code of the qmerge CUDA kernels (semantics: qmerge/ops/reference.py; bit layout:
// shared/DESIGN.md). Under NVRTC it includes no header at all, so the same text compiles with nvcc into
// qmerge._C_cuda (csrc/cuda/*.cu launch it) and with NVRTC for the CuPy fallback
// (qmerge/ops/_cupy.py launches it): the kernels are `extern "C"`, one per dtype, named
// qm_<kernel>_<dtype>.
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
  printf("qmerge.%s: 'task_ids'[%lld] = %lld is out of range: expected -1 (no task) or 0..%d\n",
         op, n, id, tasks - 1);
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

// --- dequant_add_sign ---------------------------------------------------------------------------
// dst = base + sum_t ascales[t] (expanded) * (2 bits[t] - 1); ascales = alpha_t * scale_t, fp32.
// A thread owns kDequantChunks bytes of a row (8 columns each, blockDim.x bytes apart): all their
// 16-byte loads are issued before the first use, so that enough bytes are in flight per SM to
// reach the copy bandwidth (one load per thread reached 0.70 of it on an H100). Tasks are added
// in order. Rows stride over blockIdx.y. `dst` may be `base` (in place): each thread reads its
// columns before writing them.
constexpr int kDequantChunks = 4;

template <class D>
__device__ void qm_dequant(const typename D::T* base, const qm_u8* packed, const float* ascales,
                           int scale_rows, int groups, qm_i64 gs, int tasks, typename D::T* dst,
                           qm_i64 rows, qm_i64 in, int vec) {
  const qm_i64 nb = (in + 7) / 8;
  const qm_i64 b0 = qm_i64(blockIdx.x) * blockDim.x * kDequantChunks + threadIdx.x;
  if (b0 >= nb) return;
  const qm_i64 step = blockDim.x;
  // Every chunk of this thread whole and aligned: raw 16-byte words held until use (few
  // registers, so many threads per SM).
  const bool fast = vec && (b0 + (kDequantChunks - 1) * step) * 8 + 8 <= in;
  for (qm_i64 r = blockIdx.y; r < rows; r += gridDim.y) {
    const typename D::T* src = base + r * in;
    if (fast) {
      QmRaw8<D> raw[kDequantChunks];
      qm_u32 first[kDequantChunks];
      const qm_u8* bits0 = packed + r * nb;
#pragma unroll
      for (int j = 0; j < kDequantChunks; ++j) {
        raw[j] = qm_load_raw8<D>(src + (b0 + j * step) * 8);
        first[j] = tasks > 0 ? bits0[b0 + j * step] : 0u;
      }
#pragma unroll
      for (int j = 0; j < kDequantChunks; ++j) {
        const qm_i64 b = b0 + j * step;
        float w[8];
        qm_unpack8<D>(raw[j], w);
        for (int t = 0; t < tasks; ++t) {
          const qm_u32 byte = t == 0 ? first[j] : packed[(qm_i64(t) * rows + r) * nb + b];
          float s[8];
          qm_scales8(ascales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : r)) * groups,
                     groups, gs, b * 8, s);
#pragma unroll
          for (int e = 0; e < 8; ++e) w[e] += (byte >> e) & 1u ? s[e] : -s[e];
        }
        qm_store8<D>(dst + r * in, b * 8, in, true, w);
      }
      continue;
    }
    for (int j = 0; j < kDequantChunks; ++j) {  // tails, unaligned rows: one chunk at a time
      const qm_i64 b = b0 + j * step;
      if (b >= nb) break;
      const bool v = vec && b * 8 + 8 <= in;
      float w[8];
      qm_load8<D>(src, b * 8, in, v, w);
      for (int t = 0; t < tasks; ++t) {
        const qm_u32 byte = packed[(qm_i64(t) * rows + r) * nb + b];
        float s[8];
        qm_scales8(ascales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : r)) * groups,
                   groups, gs, b * 8, s);
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] += (byte >> e) & 1u ? s[e] : -s[e];
      }
      qm_store8<D>(dst + r * in, b * 8, in, v, w);
    }
  }
}

// --- sign_linear, small batches: one pass over the base and the bits ---------------------------
// y[n, o] = x[n] . W[o] + sum over row n's terms (t, c) of c * sum_g s[t, o, g] x[n, g] . sign
// (+ bias), for up to NR rows. A warp owns an output row o at a time; each lane reads 8 columns
// per chunk (16 bytes of W, one byte of bits per row's task), kGemvChunks chunks at a time with
// all their loads issued first. With task ids every row's task is read in the same pass as W; a
// mixture (coeffs) runs its terms in a second pass over the bits, reading x again (from L1/L2:
// it is small).
constexpr int kGemvChunks = 4;

template <class D, int NR>
__device__ void qm_sign_gemv(const typename D::T* x, const typename D::T* w, const qm_u8* packed,
                             const float* scales, int scale_rows, int groups, qm_i64 gs,
                             int tasks, const void* ids, int ids64, const float* coeffs,
                             const float* bias, typename D::T* y, int rows, qm_i64 out,
                             qm_i64 in, int vec) {
  const qm_i64 nb = (in + 7) / 8;
  const int lane = threadIdx.x & 31;
  const qm_i64 warps = qm_i64(gridDim.x) * (blockDim.x >> 5);
  int task[NR];
#pragma unroll
  for (int n = 0; n < NR; ++n) {
    task[n] = (ids != nullptr && n < rows) ? qm_task_id(ids, ids64, n, tasks, "sign_linear") : -1;
  }
  const bool uniform = groups == 1 || gs % 8 == 0;  // one scale per 8-column chunk
  for (qm_i64 o = qm_i64(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); o < out;
       o += warps) {
    float acc[NR];
#pragma unroll
    for (int n = 0; n < NR; ++n) acc[n] = 0.0f;
    const float* srow[NR];
#pragma unroll
    for (int n = 0; n < NR; ++n) {
      const int t = task[n] < 0 ? 0 : task[n];
      srow[n] = scales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : o)) * groups;
    }
    for (qm_i64 bb = lane; bb < nb; bb += 32 * kGemvChunks) {
      QmRaw8<D> wraw[kGemvChunks];  // raw 16-byte words until use: few registers
      qm_u32 bits[kGemvChunks][NR];
#pragma unroll
      for (int u = 0; u < kGemvChunks; ++u) {
        const qm_i64 b = bb + 32 * u;
        if (vec && b < nb && b * 8 + 8 <= in) wraw[u] = qm_load_raw8<D>(w + o * in + b * 8);
#pragma unroll
        for (int n = 0; n < NR; ++n) {
          bits[u][n] = (b < nb && n < rows && task[n] >= 0)
                           ? packed[(qm_i64(task[n]) * out + o) * nb + b] : 0u;
        }
      }
#pragma unroll
      for (int u = 0; u < kGemvChunks; ++u) {
        const qm_i64 b = bb + 32 * u;
        if (b >= nb) break;
        const qm_i64 c0 = b * 8;
        const bool v = vec && c0 + 8 <= in;
        float wv[8];
        if (v) {
          qm_unpack8<D>(wraw[u], wv);
        } else {
          qm_load8<D>(w + o * in, c0, in, false, wv);
        }
#pragma unroll
        for (int n = 0; n < NR; ++n) {
          if (n >= rows) break;
          float xv[8];
          qm_load8<D>(x + n * in, c0, in, v, xv);
          float d = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) d = fmaf(xv[j], wv[j], d);
          acc[n] += d;
          if (task[n] < 0) continue;
          const qm_u32 byte = bits[u][n];
          if (uniform) {
            float sd = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) sd += (byte >> j) & 1u ? xv[j] : -xv[j];
            acc[n] = fmaf(srow[n][groups == 1 ? 0 : c0 / gs], sd, acc[n]);
          } else {
            float s[8];
            qm_scales8(srow[n], groups, gs, c0, s);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[n] = fmaf((byte >> j) & 1u ? s[j] : -s[j], xv[j], acc[n]);
          }
        }
      }
    }
    if (coeffs != nullptr) {  // mixtures: each nonzero (row, task) term, one more pass
      for (int n = 0; n < rows && n < NR; ++n) {
        for (int t = 0; t < tasks; ++t) {
          const float c = coeffs[qm_i64(n) * tasks + t];
          if (c == 0.0f) continue;
          const float* sr = scales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : o)) * groups;
          float part = 0.0f;
          for (qm_i64 b = lane; b < nb; b += 32) {
            const qm_i64 c0 = b * 8;
            float xv[8], s[8];
            qm_load8<D>(x + n * in, c0, in, vec && c0 + 8 <= in, xv);
            qm_scales8(sr, groups, gs, c0, s);
            const qm_u32 byte = packed[(qm_i64(t) * out + o) * nb + b];
#pragma unroll
            for (int j = 0; j < 8; ++j) part = fmaf((byte >> j) & 1u ? s[j] : -s[j], xv[j], part);
          }
#pragma unroll
          for (int k = 0; k < NR; ++k) {
            if (k == n) acc[k] = fmaf(c, part, acc[k]);
          }
        }
      }
    }
#pragma unroll
    for (int n = 0; n < NR; ++n) {
      if (n >= rows) break;
      const float total = qm_warp_sum(acc[n]);
      if (lane == 0) y[qm_i64(n) * out + o] = D::store(total + (bias ? bias[o] : 0.0f));
    }
  }
}

// --- sign_linear, large batches: the bits pass on tensor cores ---------------------------------
// y32 [N, out] already holds x W^T (cuBLAS, fp32 out). This adds every row's task terms. Rows are
// taken in `order` (sorted by task, so a tile of 8 rows has few tasks); a warp owns 16 output
// rows x 8 rows (one mma.m16n8k16 tile) and, for each task its rows use, runs
//   acc += sign_t[o-tile, k-step] (16x16, expanded from the bits in registers) x x[rows, k-step]^T
// over the columns of each scale group, then folds c[n, t] * s[t, o, g] * acc into its result.
// A bit expands to +-1 with one shift and one LOP3 per pair (the sign bit of a 16-bit float).
// Grid: x over tiles of 8 rows, y over groups of (blockDim.x / 32) x 16 output rows. Needs sm_80+;
// groups must be 1 or a multiple of 16 columns (the host checks).
template <class D>
__device__ __forceinline__ qm_u32 qm_sign_pair(qm_u32 byte, int q) {
  const qm_u32 w = byte | (byte << 15);     // bit j at j (low copy) and at 15 + j (high copy)
  const qm_u32 v = w << (15 - 2 * q);       // bit 2q -> 15, bit 2q+1 -> 31
  return (~v & 0x80008000u) | D::kOnePair;  // set bit: +1, clear bit: -1
}

template <class D>
__device__ __forceinline__ void qm_mma(float c[4], const qm_u32 a[4], const qm_u32 b[2]);

template <>
__device__ __forceinline__ void qm_mma<QmBF16>(float c[4], const qm_u32 a[4], const qm_u32 b[2]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void qm_mma<QmF16>(float c[4], const qm_u32 a[4], const qm_u32 b[2]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// Two consecutive 16-bit values of row p at column k (k even) as one register; 0 past `in`.
__device__ __forceinline__ qm_u32 qm_pair16(const qm_u16* p, qm_i64 k, qm_i64 in, bool even) {
  if (even && k + 2 <= in) return *reinterpret_cast<const qm_u32*>(p + k);
  const qm_u32 lo = k < in ? p[k] : 0u, hi = k + 1 < in ? p[k + 1] : 0u;
  return lo | (hi << 16);
}

template <class D>
__device__ void qm_sign_mma(const qm_u16* x, const qm_u8* packed, const float* scales,
                            int scale_rows, int groups, qm_i64 gs, int tasks, const void* ids,
                            int ids64, const int* order, const float* coeffs, float* y32,
                            int rows, qm_i64 out, qm_i64 in, int wide_ok) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const qm_i64 o0 = (qm_i64(blockIdx.y) * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 16;
  const qm_i64 n0 = qm_i64(blockIdx.x) * 8;
  if (o0 >= out) return;
  const qm_i64 nb = (in + 7) / 8;
  const bool even = in % 2 == 0;
  // 16-byte loads of bits: rows start 16-byte aligned and every group starts on a 128 boundary.
  const bool wide = wide_ok && nb % 16 == 0 && (groups == 1 || gs % 128 == 0);
  // This lane's B column (row n0 + g) and its two accumulator columns (rows n0 + 2q, + 1).
  const int nb_row = n0 + g < rows ? order[n0 + g] : -1;
  const int ncol[2] = {n0 + 2 * q < rows ? order[n0 + 2 * q] : -1,
                       n0 + 2 * q + 1 < rows ? order[n0 + 2 * q + 1] : -1};
  // Lane i < 8 holds the task of tile row i (task-id routing), -1 past the batch.
  int my_task = -1;
  if (ids != nullptr && lane < 8 && n0 + lane < rows) {
    my_task = qm_task_id(ids, ids64, order[n0 + lane], tasks, "sign_linear");
  }
  const qm_i64 orow[2] = {o0 + g, o0 + g + 8};
  const bool ovalid[2] = {orow[0] < out, orow[1] < out};
  float result[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int steps = ids != nullptr ? 8 : tasks;
  for (int i = 0; i < steps; ++i) {
    int t;
    float cb, cc[2];  // this lane's coefficient for its B row and its accumulator columns
    if (ids != nullptr) {
      t = __shfl_sync(0xFFFFFFFFu, my_task, i);
      const int prev = __shfl_sync(0xFFFFFFFFu, my_task, i > 0 ? i - 1 : 0);
      if (t < 0 || (i > 0 && prev == t)) continue;  // sorted: each task once
      cb = __shfl_sync(0xFFFFFFFFu, my_task, g) == t ? 1.0f : 0.0f;
      cc[0] = __shfl_sync(0xFFFFFFFFu, my_task, 2 * q) == t ? 1.0f : 0.0f;
      cc[1] = __shfl_sync(0xFFFFFFFFu, my_task, 2 * q + 1) == t ? 1.0f : 0.0f;
    } else {
      t = i;
      const float mine = lane < 8 && n0 + lane < rows ? coeffs[qm_i64(order[n0 + lane]) * tasks + t]
                                                      : 0.0f;
      if (!__any_sync(0xFFFFFFFFu, mine != 0.0f)) continue;
      cb = __shfl_sync(0xFFFFFFFFu, mine, g);
      cc[0] = __shfl_sync(0xFFFFFFFFu, mine, 2 * q);
      cc[1] = __shfl_sync(0xFFFFFFFFu, mine, 2 * q + 1);
    }
    const qm_u8* bits[2];
    const float* srow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const qm_i64 o = ovalid[h] ? orow[h] : o0;  // rows past `out`: read a valid row, drop it
      bits[h] = packed + (qm_i64(t) * out + o) * nb;
      srow[h] = scales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : o)) * groups;
    }
    const qm_u16* xr = cb != 0.0f ? x + qm_i64(nb_row) * in : nullptr;  // unused rows: B = 0
    for (int gi = 0; gi < groups; ++gi) {
      const qm_i64 k_begin = gi * gs, k_end = k_begin + gs < in ? k_begin + gs : in;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      qm_i64 k0 = k_begin;
      if (wide) {
        // 128 columns at a time: one 16-byte load of bits per row, 16 loads of x, then 8 mmas
        // from registers (one load round trip per 8 k-steps instead of one per k-step).
        for (; k0 < k_end; k0 += 128) {  // 128-aligned groups: chunks never straddle one
          const qm_v16 bg = *reinterpret_cast<const qm_v16*>(bits[0] + k0 / 8);
          const qm_v16 bh = *reinterpret_cast<const qm_v16*>(bits[1] + k0 / 8);
          const qm_u32 wg[4] = {bg.a, bg.b, bg.c, bg.d}, wh[4] = {bh.a, bh.b, bh.c, bh.d};
          qm_u32 xb[16];
#pragma unroll
          for (int s = 0; s < 8; ++s) {
            xb[2 * s] = xr ? qm_pair16(xr, k0 + 16 * s + 2 * q, k_end, even) : 0u;
            xb[2 * s + 1] = xr ? qm_pair16(xr, k0 + 16 * s + 8 + 2 * q, k_end, even) : 0u;
          }
#pragma unroll
          for (int s = 0; s < 8; ++s) {
            const int sh = 16 * (s & 1);
            qm_u32 a[4];
            a[0] = qm_sign_pair<D>((wg[s >> 1] >> sh) & 0xFFu, q);
            a[1] = qm_sign_pair<D>((wh[s >> 1] >> sh) & 0xFFu, q);
            a[2] = qm_sign_pair<D>((wg[s >> 1] >> (sh + 8)) & 0xFFu, q);
            a[3] = qm_sign_pair<D>((wh[s >> 1] >> (sh + 8)) & 0xFFu, q);
            const qm_u32 b[2] = {xb[2 * s], xb[2 * s + 1]};
            qm_mma<D>(acc, a, b);
          }
        }
      }
      for (; k0 < k_end; k0 += 16) {
        const qm_i64 byte0 = k0 / 8;
        qm_u32 a[4], b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const qm_u32 lo = bits[h][byte0];
          const qm_u32 hi = byte0 + 1 < nb ? bits[h][byte0 + 1] : 0u;
          a[h] = qm_sign_pair<D>(lo, q);      // a0a1 (row g), a2a3 (row g+8): k 2q, 2q+1
          a[2 + h] = qm_sign_pair<D>(hi, q);  // a4a5, a6a7: k 2q+8, 2q+9
        }
        if (xr != nullptr) {
          b[0] = qm_pair16(xr, k0 + 2 * q, k_end, even);
          b[1] = qm_pair16(xr, k0 + 8 + 2 * q, k_end, even);
        } else {
          b[0] = b[1] = 0u;
        }
        qm_mma<D>(acc, a, b);
      }
      const float s0 = srow[0][gi], s1 = srow[1][gi];
      result[0] = fmaf(s0 * cc[0], acc[0], result[0]);
      result[1] = fmaf(s0 * cc[1], acc[1], result[1]);
      result[2] = fmaf(s1 * cc[0], acc[2], result[2]);
      result[3] = fmaf(s1 * cc[1], acc[3], result[3]);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (ovalid[h] && ncol[j] >= 0) y32[qm_i64(ncol[j]) * out + orow[h]] += result[2 * h + j];
    }
  }
}

// y = round(y32 + bias): the last step of the GEMM paths.
template <class D>
__device__ void qm_finish(const float* y32, const float* bias, typename D::T* y, qm_i64 rows,
                          qm_i64 out) {
  const qm_i64 i = qm_i64(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * out) return;
  y[i] = D::store(y32[i] + (bias ? bias[i % out] : 0.0f));
}

// --- lowrank_linear -----------------------------------------------------------------------------
// shrink: z[n, slot, k] += c * x[n, cols] . V_t[k, cols] for k < rank, over the columns of
// blockIdx.z (kShrinkCols each); z starts at 0. With task ids slot 0 is the row's task, with
// coeffs slot t is task t (nothing to add when c = 0). A warp per rank component at a time,
// 16-byte loads; splitting the columns over blocks gives a batch of a few rows enough warps.
constexpr int kShrinkCols = 2048;

template <class D>
__device__ void qm_lowrank_shrink(const typename D::T* x, const typename D::T* V, int tasks,
                                  int full_rank, int rank, const void* ids, int ids64,
                                  const float* coeffs, float* z, qm_i64 in, int vec) {
  const int n = blockIdx.x, slot = blockIdx.y, slots = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int t;
  float c;
  if (ids != nullptr) {
    t = qm_task_id(ids, ids64, n, tasks, "lowrank_linear");
    c = 1.0f;
  } else {
    t = slot;
    c = coeffs[qm_i64(n) * tasks + t];
  }
  if (t < 0 || c == 0.0f) return;
  float* zn = z + (qm_i64(n) * slots + slot) * rank;
  const qm_i64 col0 = qm_i64(blockIdx.z) * kShrinkCols;
  const qm_i64 col1 = col0 + kShrinkCols < in ? col0 + kShrinkCols : in;
  for (int k = warp; k < rank; k += warps) {
    const typename D::T* vrow = V + (qm_i64(t) * full_rank + k) * in;
    float d = 0.0f;
#pragma unroll 4
    for (qm_i64 c0 = col0 + lane * 8; c0 < col1; c0 += 32 * 8) {
      const bool v = vec && c0 + 8 <= in;
      float xv[8], vv[8];
      qm_load8<D>(x + qm_i64(n) * in, c0, col1, v, xv);
      qm_load8<D>(vrow, c0, col1, v, vv);
#pragma unroll
      for (int j = 0; j < 8; ++j) d = fmaf(xv[j], vv[j], d);
    }
    d = qm_warp_sum(d);
    if (lane == 0) atomicAdd(zn + k, c * d);
  }
}

// expand: y[n, o] = round(y32[n, o] + sum_slot sum_k z[n, slot, k] U_t[o, k] + bias[o]), a thread
// per output o of row blockIdx.y.
template <class D>
__device__ void qm_lowrank_expand(const float* y32, const typename D::T* U, int tasks,
                                  int full_rank, int rank, int slots, const void* ids, int ids64,
                                  const float* coeffs, const float* z, const float* bias,
                                  typename D::T* y, qm_i64 out) {
  const qm_i64 o = qm_i64(blockIdx.x) * blockDim.x + threadIdx.x;
  const int n = blockIdx.y;
  if (o >= out) return;
  float acc = y32[qm_i64(n) * out + o];
  for (int slot = 0; slot < slots; ++slot) {
    int t;
    if (ids != nullptr) {
      t = qm_task_id(ids, ids64, n, tasks, "lowrank_linear");
    } else {
      t = slot;
      if (coeffs[qm_i64(n) * tasks + t] == 0.0f) continue;
    }
    if (t < 0) continue;
    const typename D::T* urow = U + (qm_i64(t) * out + o) * full_rank;
    const float* zn = z + (qm_i64(n) * slots + slot) * rank;
    for (int k = 0; k < rank; ++k) acc = fmaf(zn[k], D::load(urow[k]), acc);
  }
  y[qm_i64(n) * out + o] = D::store(acc + (bias ? bias[o] : 0.0f));
}

// --- the entry points, one per dtype ------------------------------------------------------------
// With QM_KERNEL_DECLARATIONS_ONLY defined they are only declared: csrc/cuda/kernels.cu defines
// them once and the op files launch them.
#ifdef QM_KERNEL_DECLARATIONS_ONLY
#define QM_BODY(...) ;
#else
#define QM_BODY(...) { __VA_ARGS__; }
#endif

#define QM_DTYPE_KERNELS(SUF, D)                                                               \
  extern "C" __global__ void qm_dequant_##SUF(                                                 \
      const D::T* base, const qm_u8* packed, const float* ascales, int scale_rows, int groups, \
      qm_i64 gs, int tasks, D::T* dst, qm_i64 rows, qm_i64 in, int vec)                       \
      QM_BODY(qm_dequant<D>(base, packed, ascales, scale_rows, groups, gs, tasks, dst, rows,  \
                            in, vec))                                                          \
  QM_GEMV_KERNEL(SUF, D, 1)                                                                    \
  QM_GEMV_KERNEL(SUF, D, 2)                                                                    \
  QM_GEMV_KERNEL(SUF, D, 4)                                                                    \
  QM_GEMV_KERNEL(SUF, D, 8)                                                                    \
  extern "C" __global__ void qm_finish_##SUF(const float* y32, const float* bias, D::T* y,    \
                                             qm_i64 rows, qm_i64 out)                         \
      QM_BODY(qm_finish<D>(y32, bias, y, rows, out))                                           \
  extern "C" __global__ void qm_lowrank_shrink_##SUF(                                          \
      const D::T* x, const D::T* V, int tasks, int full_rank, int rank, const void* ids,      \
      int ids64, const float* coeffs, float* z, qm_i64 in, int vec)                           \
      QM_BODY(qm_lowrank_shrink<D>(x, V, tasks, full_rank, rank, ids, ids64, coeffs, z, in,   \
                                   vec))                                                       \
  extern "C" __global__ void qm_lowrank_expand_##SUF(                                          \
      const float* y32, const D::T* U, int tasks, int full_rank, int rank, int slots,         \
      const void* ids, int ids64, const float* coeffs, const float* z, const float* bias,     \
      D::T* y, qm_i64 out)                                                                     \
      QM_BODY(qm_lowrank_expand<D>(y32, U, tasks, full_rank, rank, slots, ids, ids64, coeffs, \
                                   z, bias, y, out))

#define QM_GEMV_KERNEL(SUF, D, NR)                                                             \
  extern "C" __global__ void qm_sign_gemv##NR##_##SUF(                                        \
      const D::T* x, const D::T* w, const qm_u8* packed, const float* scales, int scale_rows, \
      int groups, qm_i64 gs, int tasks, const void* ids, int ids64, const float* coeffs,      \
      const float* bias, D::T* y, int rows, qm_i64 out, qm_i64 in, int vec)                   \
      QM_BODY(qm_sign_gemv<D, NR>(x, w, packed, scales, scale_rows, groups, gs, tasks, ids,   \
                                  ids64, coeffs, bias, y, rows, out, in, vec))

#define QM_MMA_KERNEL(SUF, D)                                                                  \
  extern "C" __global__ void qm_sign_mma_##SUF(                                               \
      const qm_u16* x, const qm_u8* packed, const float* scales, int scale_rows, int groups,  \
      qm_i64 gs, int tasks, const void* ids, int ids64, const int* order, const float* coeffs,\
      float* y32, int rows, qm_i64 out, qm_i64 in, int wide_ok)                               \
      QM_BODY(qm_sign_mma<D>(x, packed, scales, scale_rows, groups, gs, tasks, ids, ids64,    \
                             order, coeffs, y32, rows, out, in, wide_ok))

QM_DTYPE_KERNELS(f32, QmF32)
QM_DTYPE_KERNELS(f16, QmF16)
QM_DTYPE_KERNELS(bf16, QmBF16)
QM_MMA_KERNEL(f16, QmF16)
QM_MMA_KERNEL(bf16, QmBF16)
