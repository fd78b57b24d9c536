#include "sign_path.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <set>
#include <string>

#include "isa.h"
#include "sign_lut.h"

namespace qmerge::cpu {
namespace {

double threads() { return double(std::max(1, at::get_num_threads())); }

// The lookup path's base product: qmerge's GEMV up to kLutOwnGemvRows rows, else F.linear.
double gemm_cost(const SignCosts& c, int64_t rows, int64_t out, int64_t in, int64_t weight_bytes) {
  if (rows <= kLutOwnGemvRows) {
    return std::max(weight_bytes * c.byte_s, rows * out * in * c.gemv_mac_s / threads());
  }
  return std::max(weight_bytes * c.gemm_byte_s, rows * out * in * c.gemm_mac_s / threads());
}

double fused_pass(const SignCosts& c, int64_t rows, const SignSet& s, int64_t in,
                  int64_t weight_bytes) {
  const double bytes = weight_bytes + double(rows) * s.out * s.nb;
  return std::max(bytes * c.byte_s, rows * s.out * in * c.fused_mac_s / threads());
}

}  // namespace

const SignCosts& sign_costs(at::ScalarType dtype) {
  // AMD EPYC (Zen 4) VM, 2 cores, bf16 4096x4096: bench/results/kernels-cpu.md, mixed table.
  static const SignCosts bf16{
      1.0 / 25e9,   // ~25 GB/s reading weights (the GEMV kernels read at about that)
      1.0 / 13e9,   // F.linear bf16 at 8-16 rows: ~13 GB/s of weights
      1.0 / 80e9,   // the bf16 GEMM at 32+ rows: ~80 GMAC/s per core
      1.0 / 30e9,   // the per-task path's passes at 8+ tasks: ~30 GMAC/s per core
      1.0 / 42e9,   // qmerge's base-only bf16 GEMV at 8 rows: ~42 GMAC/s per core
      1.0 / 240e9,  // lookup kernel with its tables: ~240 G sign-MAC/s per core
      4e-9,         // quantizing a column and writing its share of the tables
      3.0,          // a rebuilt weight: read base, write and re-read the merged weight
  };
  // The same VM at fp32, SmolLM2-135M's shapes: bench/results/kernels-mixed-fp32.md
  // (`python -m bench.kernels_mixed`).
  static const SignCosts f32{
      1.0 / 25e9,  // weights, as at bf16
      1.0 / 14e9,  // F.linear fp32 at 8 rows: ~14 GB/s of weights
      1.0 / 28e9,  // the fp32 GEMM at 32 rows: ~28 GMAC/s per core
      1.0 / 14e9,  // the per-task path's fused passes over 5 tasks: ~14 GMAC/s per core
      1.0 / 25e9,  // qmerge's base-only fp32 GEMV
      1.0 / 80e9,  // fp32 lookups (2.5x those of the int16 tables) with their tables
      4e-9,        // a column's share of the tables
      1.0,         // these weights (a few MB) are rebuilt in cache: about one pass
  };
  return dtype == at::kFloat ? f32 : bf16;
}

double per_task_cost(const SignCosts& c, const SignSet& s, const Routes& r, int64_t in,
                     int64_t weight_bytes) {
  const int64_t rows = r.rows(), out = s.out;
  if (r.max_terms > 1) {  // mixtures: fused passes of one row each
    return double(rows) * fused_pass(c, 1, s, in, weight_bytes);
  }
  std::vector<int64_t> count(1, 0);
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t slot = r.terms(n) ? r.task[r.offset[n]] + 1 : 0;
    if (slot >= int64_t(count.size())) count.resize(slot + 1, 0);
    ++count[slot];
  }
  double cost = 0.0;
  int64_t fused = 0;
  for (size_t slot = 0; slot < count.size(); ++slot) {
    if (count[slot] == 0) continue;
    if (count[slot] < kMaterializeRows) {
      fused += count[slot];
      continue;
    }
    cost += gemm_cost(c, count[slot], out, in, weight_bytes);
    if (slot > 0) cost += c.rebuild_passes * weight_bytes * c.byte_s;  // rebuild the weight
  }
  const int64_t passes = (fused + 3) / 4;
  return cost + double(passes) * fused_pass(c, std::min<int64_t>(fused, 4), s, in, weight_bytes);
}

double lut_cost(const SignCosts& c, const SignSet& s, const Routes& r, int64_t in,
                int64_t weight_bytes) {
  std::set<int32_t> present(r.task.begin(), r.task.end());
  int64_t used = 0;
  for (int64_t n = 0; n < r.rows(); ++n) used += r.terms(n) > 0;
  const double pairs = double(r.task.size());
  return gemm_cost(c, r.rows(), s.out, in, weight_bytes) +
         pairs * s.out * in * c.lut_mac_s / threads() +
         double(present.size()) * s.out * s.nb * c.byte_s +
         double(used) * in * c.table_col_s / threads();
}

SignPath choose_sign_path(const at::Tensor& x, const SignSet& s, const Routes& r) {
  const char* env = std::getenv("QMERGE_SIGN_PATH");
  const std::string forced = env ? env : "";
  if (forced == "lut") {
    TORCH_CHECK_VALUE(lut_supported(s),
                      "qmerge.sign_linear: QMERGE_SIGN_PATH=lut needs one scale "
                      "per output row, but these scales have ",
                      s.groups, " groups per row");
    return SignPath::lut;
  }
  if (forced == "per_task") return SignPath::per_task;
  if (forced == "fused") return SignPath::fused;
  if (forced == "materialized") return SignPath::materialized;
  TORCH_CHECK_VALUE(forced.empty() || forced == "auto", "qmerge: QMERGE_SIGN_PATH='", forced,
                    "' is not a path: expected auto, per_task, fused, materialized or lut");
  const bool lut_dtype = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat;
  if (!kernels().lut_vector || !lut_supported(s) || !lut_dtype || r.task.empty()) {
    return SignPath::per_task;
  }
  const int64_t in = x.size(1), weight_bytes = s.out * in * int64_t(x.element_size());
  const SignCosts& c = sign_costs(x.scalar_type());
  return lut_cost(c, s, r, in, weight_bytes) < per_task_cost(c, s, r, in, weight_bytes)
             ? SignPath::lut
             : SignPath::per_task;
}

}  // namespace qmerge::cpu
