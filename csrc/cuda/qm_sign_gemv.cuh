// sign_linear for 1-2 rows and fp32: one pass over the base and the bits.
#pragma once

#include "qm_common.cuh"

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
                             const float* scales, int scale_rows, int groups, qm_i64 gs, int tasks,
                             const void* ids, int ids64, const float* coeffs, const float* bias,
                             typename D::T* y, int rows, qm_i64 out, qm_i64 in, int vec) {
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
                           ? packed[(qm_i64(task[n]) * out + o) * nb + b]
                           : 0u;
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
            for (int j = 0; j < 8; ++j)
              acc[n] = fmaf((byte >> j) & 1u ? s[j] : -s[j], xv[j], acc[n]);
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
