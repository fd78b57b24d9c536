// Host-side helpers of the CUDA op wrappers: the device guard and stream, the dtype of a launch,
// and the alignment test of the 16-byte paths. Only c10/cuda headers (no cuBLAS, no ATen/cuda):
// CI compiles these files on a machine with nvcc and no GPU libraries.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>

#include "../common/checks.h"

#define QM_KERNEL_DECLARATIONS_ONLY
#include "kernels.cuh"

namespace qmerge::cuda {

enum class Dt { f32, f16, bf16 };

inline Dt dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dt::f16;
    case at::kBFloat16: return Dt::bf16;
    default: return Dt::f32;
  }
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Every tensor argument on x's CUDA device.
inline void check_device(const char* op, const at::Tensor& ref, const char* ref_name,
                         std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  for (const auto& [t, name] : ts) {
    if (t != nullptr && t->defined()) check_same_device(*t, ref, op, name, ref_name);
  }
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The 16-byte path: rows of `in` columns start 16-byte aligned when the tensors do.
inline int vec_ok(int64_t in, std::initializer_list<const at::Tensor*> ts) {
  if (in % 8 != 0) return 0;
  for (const at::Tensor* t : ts) {
    if (!aligned16(*t)) return 0;
  }
  return 1;
}

// A pointer to an optional tensor's data, or null.
inline const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? t->data_ptr() : nullptr;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x W^T in fp32 (cuBLAS, fp32 accumulation and output: one rounding at the end of the op).
inline at::Tensor base_gemm_f32(const at::Tensor& x, const at::Tensor& w) {
  if (x.scalar_type() == at::kFloat) return at::mm(x, w.t());
  return at::mm(x, w.t(), at::kFloat);
}

// Task ids as given (int32 or int64) and their width flag; coefficients as fp32.
struct RoutesArg {
  at::Tensor ids, coeffs;
  int ids64 = 0;
  const void* ids_ptr() const { return ids.defined() ? ids.data_ptr() : nullptr; }
  const float* coeffs_ptr() const { return coeffs.defined() ? coeffs.data_ptr<float>() : nullptr; }
};

inline RoutesArg routes_arg(const std::optional<at::Tensor>& task_ids,
                            const std::optional<at::Tensor>& coeffs) {
  RoutesArg r;
  if (task_ids) {
    r.ids = *task_ids;
    r.ids64 = task_ids->scalar_type() == at::kLong;
  } else {
    r.coeffs = coeffs->to(at::kFloat).contiguous();
  }
  return r;
}

}  // namespace qmerge::cuda
