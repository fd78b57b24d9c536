// sign_linear for 3 rows or more: the task terms on tensor cores.
#pragma once

#include "qm_common.cuh"

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

// mma.m16n8k16 with fp32 accumulators, one specialization per 16-bit input type (its PTX name).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QM_MMA_BODY(PTX)                                            \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX \
               ".f32 {%0,%1,%2,%3}, "                               \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"             \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#else
#define QM_MMA_BODY(PTX) __trap()
#endif
#define QM_MMA_SPECIALIZATION(D, PTX)                                                           \
  template <>                                                                                   \
  __device__ __forceinline__ void qm_mma<D>(float c[4], const qm_u32 a[4], const qm_u32 b[2]) { \
    QM_MMA_BODY(PTX);                                                                           \
  }
QM_MMA_SPECIALIZATION(QmBF16, "bf16")
QM_MMA_SPECIALIZATION(QmF16, "f16")
#undef QM_MMA_SPECIALIZATION
#undef QM_MMA_BODY

// Two consecutive 16-bit values of row p at column k (k even) as one register; 0 past `in`.
__device__ __forceinline__ qm_u32 qm_pair16(const qm_u16* p, qm_i64 k, qm_i64 in, bool even) {
  if (even && k + 2 <= in) return *reinterpret_cast<const qm_u32*>(p + k);
  const qm_u32 lo = k < in ? p[k] : 0u, hi = k + 1 < in ? p[k + 1] : 0u;
  return lo | (hi << 16);
}

template <class D>
__device__ void qm_sign_mma(const qm_u16* x, const qm_u8* packed, const float* scales,
                            int scale_rows, int groups, qm_i64 gs, int tasks, const void* ids,
                            int ids64, const int* order, const float* coeffs, float* y32, int rows,
                            qm_i64 out, qm_i64 in, int wide_ok) {
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
      const float mine =
          lane < 8 && n0 + lane < rows ? coeffs[qm_i64(order[n0 + lane]) * tasks + t] : 0.0f;
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
