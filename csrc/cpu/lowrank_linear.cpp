// lowrank_linear on the CPU (semantics: qmerge/ops/reference.py):
//   y[n] = x[n] W^T + sum_t c[n, t] * (x[n] V_t^T) U_t^T, the rank-r intermediate in fp32.
// Small batches run the base and both factor products through the GEMV kernel (fp32 out, no
// conversion of the weights); large batches use GEMMs, on views of each task's runs of rows.
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"
#include "isa.h"
#include "routing.h"

namespace qmerge::cpu {
namespace {

constexpr const char* kOp = "lowrank_linear";
// Up to this many rows the GEMV kernel beats a GEMM call (and keeps fp32 accumulation).
constexpr int64_t kGemvRows = 16;
// A task's rows in more runs than this are gathered into one GEMM instead of a GEMM per run.
constexpr size_t kMaxRuns = 4;

// y32 [m, rows_w] = x32 [m, k] @ w[:, :k]^T by the GEMV kernel (m <= kGemvRows), w [rows_w, ldw]
// in the activation dtype. x_exact: x32 holds values of that dtype (see run_gemv).
at::Tensor small_matmul(const at::Tensor& x32, bool x_exact, const at::Tensor& w, int64_t rows_w,
                        int64_t ldw, int64_t k) {
  at::Tensor y32 = at::zeros({x32.size(0), rows_w}, x32.options());
  run_gemv(w, ldw, rows_w, k, x32, x_exact, plain_chunks(x32.size(0)), nullptr, y32);
  return y32;
}

// Runs of consecutive rows: a sequence's tokens are consecutive in a prefill.
std::vector<std::pair<int64_t, int64_t>> runs_of(const std::vector<int64_t>& rows) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t n : rows) {
    if (!runs.empty() && runs.back().second == n) {
      ++runs.back().second;
    } else {
      runs.push_back({n, n + 1});
    }
  }
  return runs;
}

// y32[rows] += coeff * (xf[rows] V_t[:r]^T) U_t[:, :r]^T by GEMMs (fp32). Rows in a few runs
// use views of xf and y32: no gather, no scatter, no padded copy (those cost as much as the
// rank-r GEMMs themselves at prefill sizes: bench/results/mixed-prefill-notes.md).
void add_task_gemm(const at::Tensor& xf, const at::Tensor& V, const at::Tensor& U, int64_t r,
                   const std::vector<int64_t>& rows, const std::vector<float>& coeff,
                   at::Tensor& y32) {
  const at::Tensor vt = V.narrow(0, 0, r).to(at::kFloat).t();  // [in, r]
  const at::Tensor ut = U.narrow(1, 0, r).to(at::kFloat).t();  // [r, out]
  const bool ones = std::all_of(coeff.begin(), coeff.end(), [](float c) { return c == 1.0f; });
  const at::Tensor c = ones ? at::Tensor() : at::tensor(coeff).unsqueeze(1);  // [m, 1]
  const auto runs = runs_of(rows);
  if (runs.size() > kMaxRuns) {
    const at::Tensor sel = at::tensor(rows, at::kLong);
    at::Tensor z = at::mm(xf.index_select(0, sel), vt);
    if (!ones) z.mul_(c);
    y32.index_add_(0, sel, at::mm(z, ut));
    return;
  }
  int64_t k = 0;  // position of the run's first row in rows / coeff
  for (const auto& [b, e] : runs) {
    at::Tensor z = at::mm(xf.narrow(0, b, e - b), vt);
    if (!ones) z.mul_(c.narrow(0, k, e - b));
    y32.narrow(0, b, e - b).add_(at::mm(z, ut));
    k += e - b;
  }
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

  // Each task's rows and their coefficients (a row of a mixture is in several tasks' lists).
  std::vector<std::vector<int64_t>> idx(tasks);
  std::vector<std::vector<float>> coeff(tasks);
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t k = routes.offset[n]; k < routes.offset[n + 1]; ++k) {
      idx[routes.task[k]].push_back(n);
      coeff[routes.task[k]].push_back(routes.coeff[k]);
    }
  }
  if (rows > kGemvRows) {
    at::Tensor y32 = at::linear(x, base_w).to(at::kFloat);
    const at::Tensor xf = x.to(at::kFloat);
    for (int64_t t = 0; r > 0 && t < tasks; ++t) {
      if (!idx[t].empty()) add_task_gemm(xf, V[t], U[t], r, idx[t], coeff[t], y32);
    }
    if (bias) y32.add_(bias->to(at::kFloat));
    return y32.to(x.scalar_type());
  }
  const at::Tensor x32 = padded_rows_f32(x);
  at::Tensor y32 = small_matmul(x32, true, base_w, out, in, in);
  for (int64_t t = 0; r > 0 && t < tasks; ++t) {
    if (idx[t].empty()) continue;
    const bool all = int64_t(idx[t].size()) == rows;
    const at::Tensor sel = at::tensor(idx[t], at::kLong);
    const at::Tensor xt = all ? x32 : padded_rows_f32(x32.index_select(0, sel));
    at::Tensor z = small_matmul(xt, true, V[t], r, in, in);  // [m, r]: V_t[:r] rows
    z.mul_(at::tensor(coeff[t]).unsqueeze(1));
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
