// Argument checks shared by the op files. Every message names the op and the argument, with the
// expected and the actual value (qmerge/ops/_checks.py raises the same errors for the reference).
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "kernels.h"

namespace qmerge::cpu {

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "qmerge.", op, ": '", name,
                   "' must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "qmerge.", op, ": '", name,
                    "' must be contiguous (got sizes ", t.sizes(), ", strides ", t.strides(),
                    "); call .contiguous() first");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, "qmerge.", op, ": '", name, "' must have ", dim,
                    " dimensions, got shape ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "qmerge.", op, ": '", name,
                   "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "qmerge.", op, ": '", name,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    t.device());
}

// packed [T, out, ceil(in/8)] uint8 and scales [T, R in {1, out}, G in 1..in] float; returns the
// SignSet over fp32 scales (`scales32` keeps them alive).
SignSet sign_set(const char* op, const at::Tensor& packed, const at::Tensor& scales, int64_t out,
                 int64_t in, at::Tensor& scales32);

// Runs fn(begin, end) over [0, n) on torch's intra-op threads, `grain` rows at least per task.
template <class Fn>
void parallel_rows(int64_t n, int64_t grain, const Fn& fn) {
  at::parallel_for(0, n, grain, fn);
}

}  // namespace qmerge::cpu
