// The lookup-table path of sign_linear for mixed batches: one base product over every row,
// whatever its task, plus each task's sign term for its rows by table lookup.
#pragma once

#include <optional>

#include <torch/types.h>

#include "kernels.h"
#include "routing.h"

namespace qmerge::cpu {

// The base product runs on qmerge's GEMV up to this many rows (torch's GEMM above): bf16
// 4096x4096, 8 rows: 1.7 ms against F.linear's 2.6 (bench/results/kernels-cpu.md).
constexpr int64_t kLutOwnGemvRows = 8;

// The path serves one scale per output row (per-row or per-tensor scales, G = 1).
inline bool lut_supported(const SignSet& s) { return s.groups == 1; }

// y = x W^T + bias + the sum over each row's terms (t, c) of c * scale_t[i] * (sign_t[i] . x[n]),
// the terms summed in fp32. The base product: up to kLutOwnGemvRows rows qmerge's GEMV (fp32
// out, one rounding at the end); above, for fp32 rows and weights of 4M+ entries, oneDNN's
// matmul over all rows where torch has it (unless QMERGE_ONEDNN=0), then the lookups; otherwise
// each thread owns a block of output columns and runs its GEMM there (single-threaded, x's
// dtype out, the terms added with one more rounding) and its lookups, odd threads lookups first,
// so that one core's lookups stream the bits while another's GEMM computes.
//
// Precision, bf16 and fp16 activations: x is quantized per row to int8, q = round(x / d) with
// d = max|x[n]| / 127; the tables (int16) and sums (int32) are exact integers, so the only
// rounding is |x - d q| <= d/2 per column. The term's error is then at most c * scale * d/2 per
// column and about c * scale * d * sqrt(in / 12) over a row (independent roundings). That stays
// within the project's tolerance (shared/STYLE.md rule 16: <= 2x eager torch, whose merged bf16
// weight rounds each entry by up to 2^-9 of |w|) while scale is under about a quarter of the
// weights' magnitude, which holds for fine-tuning deltas by a wide margin (BitDelta's scales are
// a few percent of |w|).
// fp32 activations are not quantized (eager fp32 is exact to ~1e-7, which int8 rows would miss
// by four orders): their tables hold fp32 sums of 4 columns and the lookups add in fp32
// (LutF32Args), so the term's error is that of an fp32 dot product of the signs with x, times
// c * scale, below the base product's own rounding (scale is a few percent of |w|). 2.5x the
// lookups of the int16 tables for the same term.
at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& packed,
                      const SignSet& s, const Routes& r, const std::optional<at::Tensor>& bias);

// The bits of `packed` [T, out, nb] re-laid for a kernel, made once per tensor and kept while the
// tensor lives and is not written to (keyed by its storage, shape and version counter), held
// only for the weights that mixed batches have used. int16 kernel: [T, tiles, nw, 32] 15-bit
// words as int16 (LutArgs; 16/15 more bits per sign). fp32 kernel (`f32`): [T, tiles, nw, 32]
// 32-bit words (LutF32Args; one more bit per sign).
at::Tensor lut_layout(const at::Tensor& packed, bool f32);

}  // namespace qmerge::cpu
