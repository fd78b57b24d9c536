// dequant_add_sign on the GPU (kernels.cuh has the entry points).
#pragma once

#include "qm_common.cuh"

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
        qm_scales8(ascales + (qm_i64(t) * scale_rows + (scale_rows == 1 ? 0 : r)) * groups, groups,
                   gs, b * 8, s);
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] += (byte >> e) & 1u ? s[e] : -s[e];
      }
      qm_store8<D>(dst + r * in, b * 8, in, v, w);
    }
  }
}
