// The inner loop of the routed GEMV (kernels/gemv.h) over fp32 x rows, for one scale group.
#pragma once

#include "kernels/bits.h"

namespace qmerge::cpu::QMERGE_ISA {

struct Term {
  const uint8_t* bits;  // this task's packed row i (zero bits for "no task")
  const float* scale;   // this task's scales for row i, [G]; null for "no task"
  float coeff;
};

// Columns [c0, c1) of one scale group, for R consecutive weight rows at once: every x vector
// loaded serves R rows (Zen 4 and friends load one 512-bit vector per cycle, so a GEMV that
// loads x once per FMA is load-bound: bench/results/kernels-cpu.md). Term p reads x row p when
// NR == NP, else x row 0.
template <class Tag, int R, int NR, int NP, bool ALIGNED>
QM_INLINE void gemv_span(const typename Tag::T* w, int64_t ldw, const float* x, int64_t ldx,
                         const Term (&tm)[R][NP > 0 ? NP : 1], int64_t nb, int64_t c0, int64_t c1,
                         typename Simd::F (&acc)[R][NR],
                         typename Simd::F (&sacc)[R][NP > 0 ? NP : 1],
                         const typename Tag::T* const* next) {
  constexpr int W = Simd::W;
  typename Simd::F wv[R], xv[NR];
  // One block of n <= W columns at c (n == W: a full block; the loop's calls fold `full`).
  auto block = [&](int64_t c, int n) QM_INLINE_LAMBDA {
    const bool full = n == W;
    // The next pass's weights, once per 64-byte line (see prefetch_next in kernels/gemv.h).
    constexpr int64_t kBytes = W * int64_t(sizeof(typename Tag::T));
    if (next && (kBytes >= 64 || ((c * int64_t(sizeof(typename Tag::T))) & 63) < kBytes)) {
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) __builtin_prefetch(next[k] + c, 0, 2);
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
      wv[k] = full ? Simd::load(Tag{}, w + k * ldw + c) : Simd::load(Tag{}, w + k * ldw + c, n);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] =
          full ? Simd::load(TagF32{}, x + r * ldx + c) : Simd::load(TagF32{}, x + r * ldx + c, n);
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) acc[k][r] = Simd::fma(wv[k], xv[r], acc[k][r]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) {
        const uint8_t* bits = tm[k][p].bits;
        const auto m = ALIGNED && full ? Simd::mask_full(bits, c)
                                       : Simd::mask(bits32_any(bits, c, nb) & low_bits(n));
        sacc[k][p] = Simd::mask_add(sacc[k][p], m, xv[NR == 1 ? 0 : p]);
      }
    }
  };
  int64_t c = c0;
  for (; c + W <= c1; c += W) block(c, W);
  if (c < c1) block(c, int(c1 - c));
}

}  // namespace qmerge::cpu::QMERGE_ISA
