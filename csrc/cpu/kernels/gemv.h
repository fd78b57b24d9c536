// The routed GEMV behind sign_linear (and the base GEMV of lowrank_linear).
//
// For one weight row i and one Chunk it computes, in one pass over w[i, :] and the task bits,
//   y[n, i] += x[n] . w[i] + sum_terms coeff * sum_g scale[t, i, g] * (sign_t[i] . x[n])_g
// using sign . x = 2 * (sum of x where the bit is 1) - sum x: the inner loop is a masked add
// per term (no multiply), and the per-group sum of x is precomputed once per call (xsum).
// x rows live in registers and serve both the dot product and every term that reads them.
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
#pragma GCC unroll 2
    for (int k = 0; k < R; ++k) wv[k] = Simd::load(Tag{}, w + k * ldw + c);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] = Simd::load(TagF32{}, x + r * ldx + c);
#pragma GCC unroll 2
      for (int k = 0; k < R; ++k) acc[k][r] = Simd::fma(wv[k], xv[r], acc[k][r]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 2
      for (int k = 0; k < R; ++k) {
        const uint8_t* bits = tm[k][p].bits;
        const auto m = ALIGNED ? Simd::mask_full(bits, c) : Simd::mask(bits_any(bits, c, nb));
        sacc[k][p] = Simd::mask_add(sacc[k][p], m, xv[NR == 1 ? 0 : p]);
      }
    }
  }
  if (c < c1) {
    const int n = int(c1 - c);
#pragma GCC unroll 2
    for (int k = 0; k < R; ++k) wv[k] = Simd::load(Tag{}, w + k * ldw + c, n);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      xv[r] = Simd::load(TagF32{}, x + r * ldx + c, n);
#pragma GCC unroll 2
      for (int k = 0; k < R; ++k) acc[k][r] = Simd::fma(wv[k], xv[r], acc[k][r]);
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) {
#pragma GCC unroll 2
      for (int k = 0; k < R; ++k) {
        const uint32_t b = bits_any(tm[k][p].bits, c, nb) & low_bits(n);
        sacc[k][p] = Simd::mask_add(sacc[k][p], Simd::mask(b), xv[NR == 1 ? 0 : p]);
      }
    }
  }
}

// Weight rows i .. i+R-1 against one chunk.
template <class Tag, int R, int NR, int NP>
void gemv_chunk(const GemvArgs& a, const typename Tag::T* w, int64_t i, const Chunk& ch) {
  static_assert(NR >= 1 && (NP == 0 || NP == NR || NR == 1), "unsupported chunk shape");
  using F = typename Simd::F;
  constexpr int NPP = NP > 0 ? NP : 1;
  const SignSet& s = a.signs;
  const float* x = a.x + ch.row * a.ldx;

  Term tm[R][NPP];
  for (int k = 0; k < R; ++k) {
    for (int p = 0; p < NP; ++p) {
      const int t = ch.task[p];
      tm[k][p] = t < 0 ? Term{a.zero_bits, nullptr, 0.0f}
                       : Term{s.bits_row(t, i + k), s.scale_row(t, i + k), ch.coeff[p]};
    }
  }
  F acc[R][NR];
  float corr[R][NR];
  for (int k = 0; k < R; ++k) {
    for (int r = 0; r < NR; ++r) {
      acc[k][r] = Simd::zero();
      corr[k][r] = 0.0f;
    }
  }
  const int64_t groups = NP > 0 ? s.groups : 1;
  const int64_t gsize = NP > 0 ? s.group_size : a.in;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * gsize;
    if (c0 >= a.in) break;
    const int64_t c1 = min64(a.in, c0 + gsize);
    F sacc[R][NPP];
    for (int k = 0; k < R; ++k) {
      for (int p = 0; p < NP; ++p) sacc[k][p] = Simd::zero();
    }
    if ((c0 & 7) == 0) {
      gemv_span<Tag, R, NR, NP, true>(w, a.ldw, x, a.ldx, tm, s.nb, c0, c1, acc, sacc);
    } else {
      gemv_span<Tag, R, NR, NP, false>(w, a.ldw, x, a.ldx, tm, s.nb, c0, c1, acc, sacc);
    }
    // Fold the group: + coeff * scale * (2 * masked_sum - sum x).
    for (int k = 0; k < R; ++k) {
      for (int p = 0; p < NP; ++p) {
        if (!tm[k][p].scale) continue;
        const int r = NR == 1 ? 0 : p;
        const float sc = tm[k][p].coeff * tm[k][p].scale[g];
        acc[k][r] = Simd::fma(sacc[k][p], Simd::set1(2.0f * sc), acc[k][r]);
        corr[k][r] += sc * a.xsum[(ch.row + r) * groups + g];
      }
    }
  }
  for (int k = 0; k < R; ++k) {
    for (int r = 0; r < NR; ++r) {
      a.y[(ch.row + r) * a.ldy + i + k] += Simd::hsum(acc[k][r]) - corr[k][r];
    }
  }
}

template <class Tag>
using ChunkFn = void (*)(const GemvArgs&, const typename Tag::T*, int64_t, const Chunk&);

// The chunk shapes the host (csrc/cpu/routing.cpp) builds: (k, 0) for k <= 8, (k, k) for
// k <= 4, (1, k) for k <= 8; each for R = 2 weight rows and R = 1 (an odd last row).
template <class Tag, int R>
ChunkFn<Tag> chunk_fn(int nr, int np) {
#define QM_SHAPE(NR, NP) \
  case (NR) * 16 + (NP): \
    return &gemv_chunk<Tag, R, NR, NP>;
  switch (nr * 16 + np) {
    QM_SHAPE(1, 0) QM_SHAPE(2, 0) QM_SHAPE(3, 0) QM_SHAPE(4, 0)
    QM_SHAPE(5, 0) QM_SHAPE(6, 0) QM_SHAPE(7, 0) QM_SHAPE(8, 0)
    QM_SHAPE(1, 1) QM_SHAPE(2, 2) QM_SHAPE(3, 3) QM_SHAPE(4, 4)
    QM_SHAPE(1, 2) QM_SHAPE(1, 3) QM_SHAPE(1, 4)
    QM_SHAPE(1, 5) QM_SHAPE(1, 6) QM_SHAPE(1, 7) QM_SHAPE(1, 8)
    default:
      return nullptr;
  }
#undef QM_SHAPE
}

template <class Tag>
void gemv_rows(const GemvArgs& a, int64_t i0, int64_t i1) {
  using T = typename Tag::T;
  constexpr int64_t kCached = 64;
  ChunkFn<Tag> pair_fns[kCached], one_fns[kCached];
  const int64_t cached = min64(a.nchunks, kCached);
  for (int64_t k = 0; k < cached; ++k) {
    pair_fns[k] = chunk_fn<Tag, 2>(a.chunks[k].nr, a.chunks[k].np);
    one_fns[k] = chunk_fn<Tag, 1>(a.chunks[k].nr, a.chunks[k].np);
  }
  for (int64_t i = i0; i < i1; i += 2) {
    const bool pair = i + 1 < i1;
    const T* w = static_cast<const T*>(a.w) + i * a.ldw;
    for (int64_t k = 0; k < a.nchunks; ++k) {
      const Chunk& ch = a.chunks[k];
      ChunkFn<Tag> fn = k < cached ? (pair ? pair_fns[k] : one_fns[k])
                                   : (pair ? chunk_fn<Tag, 2>(ch.nr, ch.np)
                                           : chunk_fn<Tag, 1>(ch.nr, ch.np));
      fn(a, w, i, ch);
    }
    if (!pair) break;
  }
}

}  // namespace qmerge::cpu::QMERGE_ISA
