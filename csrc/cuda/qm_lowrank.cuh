// lowrank_linear on the GPU: split-K shrink and fused expand.
#pragma once

#include "qm_common.cuh"

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
