// lowrank_linear on the CPU (semantics: qmerge/ops/reference.py):
//   y[n] = x[n] W^T + sum_t c[n, t] * (x[n] V_t^T) U_t^T, the rank-r intermediate in fp32.
// Small batches run the base and both factor products through the GEMV kernel (fp32 out, no
// conversion of the weights); large batches use GEMMs.
#include <torch/library.h>

#include "checks.h"
#include "isa.h"
#include "routing.h"

namespace qmerge::cpu {
namespace {

constexpr const char* kOp = "lowrank_linear";
// Up to this many rows the GEMV kernel beats a GEMM call (and keeps fp32 accumulation).
constexpr int64_t kGemvRows = 16;

// y32 [m, rows_w] = x32 [m, k] @ w[:, :k]^T, w [rows_w, ldw] in the activation dtype.
// x_exact: x32 holds values of that dtype (see run_gemv).
at::Tensor small_matmul(const at::Tensor& x32, bool x_exact, const at::Tensor& w, int64_t rows_w,
                        int64_t ldw, int64_t k) {
  const int64_t m = x32.size(0);
  if (m > kGemvRows) {
    return at::mm(x32, w.narrow(0, 0, rows_w).narrow(1, 0, k).to(at::kFloat).t());
  }
  at::Tensor y32 = at::zeros({m, rows_w}, x32.options());
  run_gemv(w, ldw, rows_w, k, x32, x_exact, plain_chunks(m), nullptr, y32);
  return y32;
}

at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& U,
                          const at::Tensor& V, const std::optional<at::Tensor>& task_ids,
                          const std::optional<at::Tensor>& coeffs,
                          const std::optional<at::Tensor>& bias, std::optional<int64_t> rank) {
  check_linear(kOp, x, base_w);
  const int64_t rows = x.size(0), in = x.size(1), out = base_w.size(0);
  const int64_t r = check_lowrank(kOp, x, U, V, out, rank);
  const int64_t tasks = U.size(0), full_rank = U.size(2);
  check_bias(kOp, bias, out);
  const Routes routes = parse_routes(kOp, rows, tasks, task_ids, coeffs);
  if (rows == 0) return at::empty({0, out}, x.options());

  const at::Tensor x32 = padded_rows_f32(x);
  at::Tensor y32 = rows > kGemvRows ? at::linear(x, base_w).to(at::kFloat)
                                    : small_matmul(x32, true, base_w, out, in, in);
  for (int64_t t = 0; r > 0 && t < tasks; ++t) {
    std::vector<int64_t> idx;
    std::vector<float> coeff;
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t k = routes.offset[n]; k < routes.offset[n + 1]; ++k) {
        if (routes.task[k] == t) {
          idx.push_back(n);
          coeff.push_back(routes.coeff[k]);
        }
      }
    }
    if (idx.empty()) continue;
    const bool all = int64_t(idx.size()) == rows;
    const at::Tensor sel = at::tensor(idx, at::kLong);
    const at::Tensor xt = all ? x32 : padded_rows_f32(x32.index_select(0, sel));
    at::Tensor z = small_matmul(xt, true, V[t], r, in, in);  // [m, r]: V_t[:r] rows
    z.mul_(at::tensor(coeff).unsqueeze(1));
    const at::Tensor dy = small_matmul(z, false, U[t], out, full_rank, r);  // U_t[:, :r]
    if (all) {
      y32.add_(dy);
    } else {
      y32.index_add_(0, sel, dy);
    }
  }
  if (bias) y32.add_(bias->to(at::kFloat));
  return y32.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CPU, m) { m.impl("lowrank_linear", &lowrank_linear); }

}  // namespace qmerge::cpu
