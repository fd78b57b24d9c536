// The inner loop of the routed GEMV with AVX512-BF16 dot products: bf16 weights against bf16
// x rows (exact copies: the host passes them only when x itself is bf16). Compiled only into
// isa_avx512bf16.cpp, which defines QMERGE_ISA_BF16DOT.
//
// vdpbf16ps multiplies 32 pairs of bf16 (exactly) and adds each pair's two products into one
// fp32 lane: one instruction and one 64-byte x load per 32 columns, where the fp32 span needs
// two converts, two FMAs and 128 bytes of x. The multi-row GEMV is bound by those x loads
// (bench/results/kernels-cpu-notes.md). The sign term keeps the fp32 span's form, the sum of x
// where the bit is 1: a dot product of x, with the other lanes zeroed, against ones.
// vdpbf16ps treats bf16 subnormals as zero and rounds the pair sum once; both are within the
// tolerance policy of tests/ops/helpers.py (x and w are bf16, so eager torch rounds too).
#pragma once

#include "kernels/gemv_span.h"

namespace qmerge::cpu::QMERGE_ISA {

QM_INLINE __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

template <class Tag, int R, int NR, int NP, bool ALIGNED>
QM_INLINE void gemv_span(const uint16_t* w, int64_t ldw, const uint16_t* x, int64_t ldx,
                         const Term (&tm)[R][NP > 0 ? NP : 1], int64_t nb, int64_t c0, int64_t c1,
                         __m512 (&acc)[R][NR], __m512 (&sacc)[R][NP > 0 ? NP : 1],
                         const uint16_t* const* next) {
  constexpr int W = 32;
  const __m512bh ones = as_bh(_mm512_set1_epi16(0x3F80));  // bf16 1.0
  __m512bh wv[R];
  __m512i xv[NR];
  // One block of 32 columns at c; `lanes` marks the columns inside the span (all of them in
  // full blocks). Columns outside are zero in both w and x, so their sign bits add nothing.
  auto block = [&](int64_t c, __mmask32 lanes, bool full) QM_INLINE_LAMBDA {
    if (next) {  // the next pass's weights, one line per row (prefetch_next, kernels/gemv.h)
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) __builtin_prefetch(next[k] + c, 0, 2);
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
      wv[k] = as_bh(full ? _mm512_loadu_si512(w + k * ldw + c)
                         : _mm512_maskz_loadu_epi16(lanes, w + k * ldw + c));
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] = full ? _mm512_loadu_si512(x + r * ldx + c)
                   : _mm512_maskz_loadu_epi16(lanes, x + r * ldx + c);
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) acc[k][r] = _mm512_dpbf16_ps(acc[k][r], wv[k], as_bh(xv[r]));
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 4
      for (int k = 0; k < R; ++k) {
        const uint8_t* bits = tm[k][p].bits;
        const __mmask32 m =
            ALIGNED && full
                ? _load_mask32(reinterpret_cast<__mmask32*>(const_cast<uint8_t*>(bits + (c >> 3))))
                : __mmask32(bits32_any(bits, c, nb));
        const __m512i xm = _mm512_maskz_mov_epi16(m, xv[NR == 1 ? 0 : p]);
        sacc[k][p] = _mm512_dpbf16_ps(sacc[k][p], as_bh(xm), ones);
      }
    }
  };
  int64_t c = c0;
  for (; c + W <= c1; c += W) block(c, ~__mmask32(0), true);
  if (c < c1) block(c, __mmask32(low_bits(int(c1 - c))), false);
}

}  // namespace qmerge::cpu::QMERGE_ISA
