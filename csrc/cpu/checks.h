// CPU-side argument handling: the checks shared with the CUDA wrappers (csrc/common/checks.h)
// plus the conversions into the kernels' argument structs.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "kernels.h"
#include "../common/checks.h"

namespace qmerge::cpu {

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: break;
  }
  check_float(t, op, name);  // throws
  return DType::f32;
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
