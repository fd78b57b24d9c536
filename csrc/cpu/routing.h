// Per-row routing (task ids or coefficient mixtures) and its split into GEMV chunks.
#pragma once

#include <optional>
#include <vector>

#include <torch/types.h>

#include "kernels.h"

namespace qmerge::cpu {

// The terms of every row in CSR form: row n uses (task[k], coeff[k]) for k in
// [offset[n], offset[n+1]). Zero coefficients are dropped; task -1 (no task) has no term.
struct Routes {
  std::vector<int64_t> offset;
  std::vector<int32_t> task;
  std::vector<float> coeff;
  int64_t max_terms = 0;

  int64_t rows() const { return int64_t(offset.size()) - 1; }
  int64_t terms(int64_t n) const { return offset[n + 1] - offset[n]; }
};

// Validates exactly one of task_ids [N] (ints in [-1, T)) and coeffs [N, T] (float).
Routes parse_routes(const char* op, int64_t rows, int64_t tasks,
                    const std::optional<at::Tensor>& task_ids,
                    const std::optional<at::Tensor>& coeffs);

// Chunks over `rows` (ascending row numbers of `routes`), numbered 0.. in the order given:
// runs of rows with at most one term become (k, 0) chunks of up to kernels().plain_rows rows
// when no row has a task, else (k, k) chunks of up to kernels().routed_rows; a row with several
// terms (at most kMaxChunk) becomes one (1, terms) chunk.
std::vector<Chunk> make_chunks(const Routes& routes, const std::vector<int64_t>& rows);

// x [M, in] (any float dtype) as fp32 rows with a padded stride (not a power of two).
at::Tensor padded_rows_f32(const at::Tensor& x);

// x [M, in] fp32 -> per-group sums [M, groups] fp32 (the "- sum x" of sign . x).
at::Tensor group_sums(const at::Tensor& x32, int64_t groups, int64_t group_size);

// y32 [M, out] += the routed GEMV of x32 [M, in] against w [out, ldw] (see kernels.h GemvArgs).
// x_exact: every value of x32 is exactly representable in w's dtype (x was given in it), which
// lets bf16 weights use bf16 dot products (KernelTable::bf16_dot).
void run_gemv(const at::Tensor& w, int64_t ldw, int64_t out, int64_t in, const at::Tensor& x32,
              bool x_exact, const std::vector<Chunk>& chunks, const SignSet* signs,
              at::Tensor& y32);

// (k, 0) chunks covering rows 0..rows-1: the plain multi-row GEMV.
std::vector<Chunk> plain_chunks(int64_t rows);
}  // namespace qmerge::cpu
