// The qmerge CUDA kernels' entry points, `extern "C"` and one per dtype (qm_<kernel>_<dtype>).
// The device code lives in the qm_*.cuh files included here. Under NVRTC these files include no
// system header: nvcc compiles them into qmerge._C_cuda (csrc/cuda/*.cu launch the kernels) and
// the CuPy fallback (qmerge/ops/_cupy.py) hands the same text, its includes inlined, to NVRTC.
// Semantics: qmerge/ops/reference.py; bit layout: shared/DESIGN.md.
#pragma once

#include "qm_common.cuh"
#include "qm_dequant.cuh"
#include "qm_lowrank.cuh"
#include "qm_sign_gemv.cuh"
#include "qm_sign_mma.cuh"

// --- the entry points, one per dtype ------------------------------------------------------------
// With QM_KERNEL_DECLARATIONS_ONLY defined they are only declared: csrc/cuda/kernels.cu defines
// them once and the op files launch them.
#ifdef QM_KERNEL_DECLARATIONS_ONLY
#define QM_BODY(...) ;
#else
#define QM_BODY(...) \
  {                  \
    __VA_ARGS__;     \
  }
#endif

#define QM_DTYPE_KERNELS(SUF, D)                                                                   \
  extern "C" __global__ void qm_dequant_##SUF(                                                     \
      const D::T* base, const qm_u8* packed, const float* ascales, int scale_rows, int groups,     \
      qm_i64 gs, int tasks, D::T* dst, qm_i64 rows, qm_i64 in,                                     \
      int vec) QM_BODY(qm_dequant<D>(base, packed, ascales, scale_rows, groups, gs, tasks, dst,    \
                                     rows, in, vec)) QM_GEMV_KERNEL(SUF, D, 1)                     \
      QM_GEMV_KERNEL(SUF, D, 2) QM_GEMV_KERNEL(SUF, D, 4)                                          \
          QM_GEMV_KERNEL(SUF, D, 8) extern "C" __global__ void qm_finish_##SUF(                    \
              const float* y32, const float* bias, D::T* y, qm_i64 rows, qm_i64 out)               \
              QM_BODY(qm_finish<D>(y32, bias, y, rows, out)) extern "C" __global__ void            \
                  qm_lowrank_shrink_##SUF(const D::T* x, const D::T* V, int tasks, int full_rank,  \
                                          int rank, const void* ids, int ids64,                    \
                                          const float* coeffs, float* z, qm_i64 in, int vec)       \
                      QM_BODY(qm_lowrank_shrink<D>(x, V, tasks, full_rank, rank, ids, ids64,       \
                                                   coeffs, z, in, vec)) extern "C" __global__ void \
                          qm_lowrank_expand_##SUF(                                                 \
                              const float* y32, const D::T* U, int tasks, int full_rank, int rank, \
                              int slots, const void* ids, int ids64, const float* coeffs,          \
                              const float* z, const float* bias, D::T* y, qm_i64 out)              \
                              QM_BODY(qm_lowrank_expand<D>(y32, U, tasks, full_rank, rank, slots,  \
                                                           ids, ids64, coeffs, z, bias, y, out))

#define QM_GEMV_KERNEL(SUF, D, NR)                                                                 \
  extern "C" __global__ void qm_sign_gemv##NR##_##SUF(                                             \
      const D::T* x, const D::T* w, const qm_u8* packed, const float* scales, int scale_rows,      \
      int groups, qm_i64 gs, int tasks, const void* ids, int ids64, const float* coeffs,           \
      const float* bias, D::T* y, int rows, qm_i64 out, qm_i64 in, int vec)                        \
      QM_BODY(qm_sign_gemv<D, NR>(x, w, packed, scales, scale_rows, groups, gs, tasks, ids, ids64, \
                                  coeffs, bias, y, rows, out, in, vec))

#define QM_MMA_KERNEL(SUF, D)                                                                     \
  extern "C" __global__ void qm_sign_mma_##SUF(                                                   \
      const qm_u16* x, const qm_u8* packed, const float* scales, int scale_rows, int groups,      \
      qm_i64 gs, int tasks, const void* ids, int ids64, const int* order, const float* coeffs,    \
      float* y32, int rows, qm_i64 out, qm_i64 in, int wide_ok)                                   \
      QM_BODY(qm_sign_mma<D>(x, packed, scales, scale_rows, groups, gs, tasks, ids, ids64, order, \
                             coeffs, y32, rows, out, in, wide_ok))

QM_DTYPE_KERNELS(f32, QmF32)
QM_DTYPE_KERNELS(f16, QmF16)
QM_DTYPE_KERNELS(bf16, QmBF16)
QM_MMA_KERNEL(f16, QmF16)
QM_MMA_KERNEL(bf16, QmBF16)
