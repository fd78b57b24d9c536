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
                         typename Simd::F (&sacc)[R][NP > 0 ? NP : 1]) {
  constexpr int W = Simd::W;
  typename Simd::F wv[R], xv[NR];
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) wv[k] = Simd::load(Tag{}, w + k * ldw + c);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] = Simd::load(TagF32{}, x + r * ldx + c);
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) acc[k][r] = Simd::fma(wv[k], xv[r], acc[k][r]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) {
        const uint8_t* bits = tm[k][p].bits;
        const auto m = ALIGNED ? Simd::mask_full(bits, c) : Simd::mask(bits32_any(bits, c, nb));
        sacc[k][p] = Simd::mask_add(sacc[k][p], m, xv[NR == 1 ? 0 : p]);
      }
    }
  }
  if (c < c1) {
    const int n = int(c1 - c);
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) wv[k] = Simd::load(Tag{}, w + k * ldw + c, n);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] = Simd::load(TagF32{}, x + r * ldx + c, n);
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) acc[k][r] = Simd::fma(wv[k], xv[r], acc[k][r]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) {
        const uint32_t b = bits32_any(tm[k][p].bits, c, nb) & low_bits(n);
        sacc[k][p] = Simd::mask_add(sacc[k][p], Simd::mask(b), xv[NR == 1 ? 0 : p]);
      }
    }
  }
}

}  // namespace qmerge::cpu::QMERGE_ISA
