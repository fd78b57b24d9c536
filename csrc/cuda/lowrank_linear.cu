// lowrank_linear on CUDA (semantics: qmerge/ops/reference.py), Punica-style: the base as one
// cuBLAS GEMM over every row (fp32 out), then per row and task used the rank-r shrink
// z = c * x V_t^T (fp32, qm_lowrank_shrink) and the expand y += z U_t^T fused with the bias and
// the one rounding (qm_lowrank_expand). No host sync, no gather of rows by task.
#include <torch/library.h>

#include "launch.h"

namespace qmerge::cuda {
namespace {

constexpr const char* kOp = "lowrank_linear";
constexpr int64_t kMaxGridY = 65535;

at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& U,
                          const at::Tensor& V, const std::optional<at::Tensor>& task_ids,
                          const std::optional<at::Tensor>& coeffs,
                          const std::optional<at::Tensor>& bias, std::optional<int64_t> rank) {
  check_linear(kOp, x, base_w);
  const int64_t rows = x.size(0), in = x.size(1), out = base_w.size(0);
  const int64_t r = check_lowrank(kOp, x, U, V, out, rank);
  const int64_t tasks = U.size(0), full_rank = U.size(2);
  check_routes(kOp, rows, tasks, task_ids, coeffs);
  check_bias(kOp, bias, out);
  const at::Tensor no;
  check_device(kOp, x, "x",
               {{&base_w, "base_w"},
                {&U, "U"},
                {&V, "V"},
                {task_ids ? &*task_ids : &no, "task_ids"},
                {coeffs ? &*coeffs : &no, "coeffs"},
                {bias ? &*bias : &no, "bias"}});
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0 || out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const RoutesArg ra = routes_arg(task_ids, coeffs);
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor y32 = base_gemm_f32(x, base_w);
  const int64_t slots = task_ids ? 1 : tasks;
  const at::Tensor z =
      at::zeros({rows, slots, std::max<int64_t>(r, 1)}, x.options().dtype(at::kFloat));
  const int vec = vec_ok(in, {&x, &V});
  const int64_t esize = x.element_size();
  const float* b = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  // Rows in chunks of kMaxGridY (the grid's y limit).
  for (int64_t n0 = 0; n0 < rows; n0 += kMaxGridY) {
    const int64_t n = std::min(kMaxGridY, rows - n0);
    const char* ids = static_cast<const char*>(ra.ids_ptr());
    const void* idp = ids ? ids + n0 * (ra.ids64 ? 8 : 4) : nullptr;
    const float* cp = ra.coeffs.defined() ? ra.coeffs_ptr() + n0 * tasks : nullptr;
    const void* xp = static_cast<const char*>(x.data_ptr()) + n0 * in * esize;
    float* zp = z.data_ptr<float>() + n0 * slots * std::max<int64_t>(r, 1);
    const float* y32p = y32.data_ptr<float>() + n0 * out;
    void* yp = static_cast<char*>(y.data_ptr()) + n0 * out * esize;
    const dim3 shrink_grid{unsigned(n), unsigned(slots), unsigned(ceil_div(in, kShrinkCols))};
    const dim3 expand_grid{unsigned(ceil_div(out, 256)), unsigned(n)};
#define QM_LOWRANK(SUF, CT)                                                                       \
  if (r > 0) {                                                                                    \
    qm_lowrank_shrink_##SUF<<<shrink_grid, 256, 0, stream()>>>(                                   \
        static_cast<const CT*>(xp), static_cast<const CT*>(V.data_ptr()), int(tasks),             \
        int(full_rank), int(r), idp, ra.ids64, cp, zp, in, vec);                                  \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                               \
  }                                                                                               \
  qm_lowrank_expand_##SUF<<<expand_grid, 256, 0, stream()>>>(                                     \
      y32p, static_cast<const CT*>(U.data_ptr()), int(tasks), int(full_rank), int(r), int(slots), \
      idp, ra.ids64, cp, zp, b, static_cast<CT*>(yp), out);                                       \
  C10_CUDA_KERNEL_LAUNCH_CHECK();
    switch (dtype_of(x)) {
      case Dt::f32: QM_LOWRANK(f32, float); break;
      case Dt::f16: QM_LOWRANK(f16, qm_u16); break;
      case Dt::bf16: QM_LOWRANK(bf16, qm_u16); break;
    }
#undef QM_LOWRANK
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CUDA, m) { m.impl("lowrank_linear", &lowrank_linear); }

}  // namespace qmerge::cuda
