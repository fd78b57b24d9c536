// Argument checks shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) op wrappers. Every message
// names the op and the argument, with the expected and the actual value; qmerge/ops/_checks.py
// raises the same errors for the reference (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE ->
// ValueError, TORCH_CHECK_INDEX -> IndexError).
#pragma once

#include <algorithm>
#include <optional>

#include <torch/types.h>

namespace qmerge {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "qmerge.", op, ": '",
                   name, "' must be float32, float16 or bfloat16, got ", s);
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

// x [N, in] and base_w [out, in]: contiguous, one float dtype.
inline void check_linear(const char* op, const at::Tensor& x, const at::Tensor& base_w) {
  check_float(x, op, "x");
  check_dim(x, 2, op, "x");
  check_contiguous(x, op, "x");
  check_same_dtype(base_w, x, op, "base_w", "x");
  check_dim(base_w, 2, op, "base_w");
  check_contiguous(base_w, op, "base_w");
  TORCH_CHECK_VALUE(base_w.size(1) == x.size(1), "qmerge.", op, ": 'base_w' must have ", x.size(1),
                    " columns (in_features of 'x'), got shape ", base_w.sizes());
}

// packed [T, out, ceil(in/8)] uint8 and scales [T, R in {1, out}, G in 1..in] float.
inline void check_sign_set(const char* op, const at::Tensor& packed, const at::Tensor& scales,
                           int64_t out, int64_t in) {
  const int64_t nb = (in + 7) / 8;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "qmerge.", op,
                   ": 'packed' must be uint8, got ", packed.scalar_type());
  check_dim(packed, 3, op, "packed");
  check_contiguous(packed, op, "packed");
  const int64_t tasks = packed.size(0);
  TORCH_CHECK_VALUE(packed.size(1) == out && packed.size(2) == nb, "qmerge.", op,
                    ": 'packed' must have shape [T, ", out, ", ", nb,
                    "] (out_features, ceil(in_features / 8)), got ", packed.sizes());
  check_float(scales, op, "scales");
  check_dim(scales, 3, op, "scales");
  check_contiguous(scales, op, "scales");
  TORCH_CHECK_VALUE(scales.size(0) == tasks, "qmerge.", op, ": 'scales' must have ", tasks,
                    " tasks (dim 0 of 'packed'), got shape ", scales.sizes());
  TORCH_CHECK_VALUE(scales.size(1) == 1 || scales.size(1) == out, "qmerge.", op,
                    ": 'scales' dim 1 must be 1 (per tensor) or ", out, " (per row), got shape ",
                    scales.sizes());
  TORCH_CHECK_VALUE(scales.size(2) >= 1 && scales.size(2) <= std::max<int64_t>(in, 1), "qmerge.",
                    op, ": 'scales' dim 2 (groups along in_features) must be in [1, ", in,
                    "], got shape ", scales.sizes());
}

// alphas [T] float (dequant_add_sign).
inline void check_alphas(const char* op, const at::Tensor& alphas, int64_t tasks) {
  check_float(alphas, op, "alphas");
  check_dim(alphas, 1, op, "alphas");
  TORCH_CHECK_VALUE(alphas.size(0) == tasks, "qmerge.", op, ": 'alphas' must have ", tasks,
                    " entries (one per task), got ", alphas.size(0));
}

// out: base's dtype and shape, contiguous (dequant_add_sign_out).
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& base) {
  check_same_dtype(out, base, op, "out", "base");
  check_contiguous(out, op, "out");
  TORCH_CHECK_VALUE(out.sizes() == base.sizes(), "qmerge.", op, ": 'out' must have the shape of ",
                    "'base' ", base.sizes(), ", got ", out.sizes());
}

// Exactly one of task_ids [N] int64/int32 or coeffs [N, T] float. Shapes and dtypes only: the
// values of task_ids are the caller's to check (on the CPU), or the kernel's (on a GPU).
inline void check_routes(const char* op, int64_t rows, int64_t tasks,
                         const std::optional<at::Tensor>& task_ids,
                         const std::optional<at::Tensor>& coeffs) {
  TORCH_CHECK_VALUE(task_ids.has_value() != coeffs.has_value(), "qmerge.", op,
                    ": pass exactly one of 'task_ids' (one task per row) or 'coeffs' (a mixture "
                    "per row), got ",
                    task_ids ? "both" : "neither");
  if (task_ids) {
    const at::Tensor& ids = *task_ids;
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt, "qmerge.", op,
                     ": 'task_ids' must be int64 or int32, got ", ids.scalar_type());
    check_dim(ids, 1, op, "task_ids");
    check_contiguous(ids, op, "task_ids");
    TORCH_CHECK_VALUE(ids.size(0) == rows, "qmerge.", op, ": 'task_ids' must have ", rows,
                      " entries (rows of 'x'), got ", ids.size(0));
  } else {
    const at::Tensor& c = *coeffs;
    check_float(c, op, "coeffs");
    check_dim(c, 2, op, "coeffs");
    check_contiguous(c, op, "coeffs");
    TORCH_CHECK_VALUE(c.size(0) == rows && c.size(1) == tasks, "qmerge.", op,
                      ": 'coeffs' must have shape [", rows, ", ", tasks,
                      "] (rows of 'x', tasks), got ", c.sizes());
  }
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t out) {
  if (!bias) return;
  check_float(*bias, op, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "qmerge.", op,
                    ": 'bias' must have shape [", out, "], got ", bias->sizes());
}

// U [T, out, r] and V [T, r, in] of x's dtype; returns the rank used (all by default).
inline int64_t check_lowrank(const char* op, const at::Tensor& x, const at::Tensor& U,
                             const at::Tensor& V, int64_t out, std::optional<int64_t> rank) {
  for (auto [t, name] : {std::pair{&U, "U"}, {&V, "V"}}) {
    check_same_dtype(*t, x, op, name, "x");
    check_contiguous(*t, op, name);
  }
  check_dim(U, 3, op, "U");
  check_dim(V, 3, op, "V");
  const int64_t tasks = U.size(0), full_rank = U.size(2);
  TORCH_CHECK_VALUE(U.size(1) == out, "qmerge.", op, ": 'U' must have shape [T, ", out,
                    ", r], got ", U.sizes());
  TORCH_CHECK_VALUE(V.size(0) == tasks && V.size(1) == full_rank && V.size(2) == x.size(1),
                    "qmerge.", op, ": 'V' must have shape [", tasks, ", ", full_rank, ", ",
                    x.size(1), "] to match 'U' ", U.sizes(), ", got ", V.sizes());
  const int64_t r = rank.value_or(full_rank);
  TORCH_CHECK_VALUE(r >= 0 && r <= full_rank, "qmerge.", op, ": 'rank' must be in [0, ", full_rank,
                    "] (the stored rank), got ", r);
  return r;
}

}  // namespace qmerge
