// Which execution of sign_linear a call gets (sign_linear.cpp): a cost model over the rows per
// task, the tasks present and the shape, or QMERGE_SIGN_PATH to force one (auto, per_task,
// fused, materialized, lut).
#pragma once

#include <torch/types.h>

#include "kernels.h"
#include "routing.h"

namespace qmerge::cpu {

// A task with at least this many rows is materialized (one dequant pass + GEMM) instead of
// fused. Fused rows cost one weight pass per 8 rows; a dequant pass costs about three
// (read base, write and re-read the merged weight): bench/results/kernels-cpu.md.
constexpr int64_t kMaterializeRows = 24;

enum class SignPath {
  per_task,      // fused passes for tasks with few rows, a rebuilt weight + GEMM for the others
  fused,         // every row in fused passes (mixtures too wide for them: materialized)
  materialized,  // every task's weight rebuilt, GEMMs
  lut,           // one base GEMM + table-lookup sign terms (sign_lut.h)
};

// Modelled seconds of each path on one core; memory bandwidth is shared, compute divides by
// the threads. Constants: `python -m bench.kernels` fits bf16's (bench/results/kernels-cpu.md),
// `python -m bench.kernels_mixed` fp32's (bench/results/kernels-mixed-fp32.md).
struct SignCosts {
  double byte_s;          // per byte streamed by qmerge's kernels (weights, bits), all cores
  double gemm_byte_s;     // per weight byte of torch's GEMM at few rows (it streams slower)
  double gemm_mac_s;      // per multiply-add of the base GEMM, one core
  double fused_mac_s;     // per multiply-add (row x weight) of a fused pass, one core
  double gemv_mac_s;      // per multiply-add of qmerge's base-only GEMV (few rows), one core
  double lut_mac_s;       // per sign multiply-add (pair x weight) of the lookup kernel, one core
  double table_col_s;     // per column of one row's quantization and tables, one core
  double rebuild_passes;  // weight passes (at byte_s) of a task's rebuilt weight
};
const SignCosts& sign_costs(at::ScalarType dtype);  // fp32's, or bf16's for the others

// The path for this call. Raises if QMERGE_SIGN_PATH is set to an unknown value or to `lut`
// for a weight the lut path does not serve (per-group scales).
SignPath choose_sign_path(const at::Tensor& x, const SignSet& s, const Routes& r);

// The model's estimates (seconds), exposed for the benchmark's table.
double per_task_cost(const SignCosts& c, const SignSet& s, const Routes& r, int64_t in,
                     int64_t weight_bytes);
double lut_cost(const SignCosts& c, const SignSet& s, const Routes& r, int64_t in,
                int64_t weight_bytes);

}  // namespace qmerge::cpu
