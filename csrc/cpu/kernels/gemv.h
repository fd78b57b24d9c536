// The routed GEMV behind sign_linear (and the base GEMV of lowrank_linear).
//
// For one weight row i and one Chunk it computes, in one pass over w[i, :] and the task bits,
//   y[n, i] += x[n] . w[i] + sum_terms coeff * sum_g scale[t, i, g] * (sign_t[i] . x[n])_g
// using sign . x = 2 * (sum of x where the bit is 1) - sum x: the inner loop is a masked add
// per term (no multiply), and the per-group sum of x is precomputed once per call (xsum).
// x rows live in registers and serve both the dot product and every term that reads them.
#pragma once

#include "kernels/gemv_span.h"
#ifdef QMERGE_ISA_BF16DOT
#include "kernels/gemv_bf16dot.h"
#endif

namespace qmerge::cpu::QMERGE_ISA {

// Columns per prefetch strip: one 64-byte line of sign bits.
constexpr int64_t kStrip = 512;

// Requests into L2 the lines of columns [c0, c1) that the next pass will read (rows
// i+R .. i+2R-1): for every term, the same task's bits of those rows, and, when `lead` (the
// pass's first chunk) and the chunk has no terms, the weights. A pass computes for long enough
// (8 rows x 8 tasks: ~25 cycles per 64-byte line of weights) that the hardware prefetchers fall
// behind and memory time adds to compute instead of hiding under it; one pass ahead hides it.
// Chunks with terms request the next weights one line per block instead (gemv_span's `next`):
// a burst of 16 lines per row at each strip start stalls their longer blocks, while base-only
// chunks lose load slots to the per-block form (bench/results/kernels-cpu-notes.md).
template <class Tag, int R, int NP>
QM_INLINE void prefetch_next(const GemvArgs& a, const typename Tag::T* w, int64_t i, bool lead,
                             const Term (&tm)[R][NP > 0 ? NP : 1], int64_t c0, int64_t c1) {
  using T = typename Tag::T;
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const int rows = int(min64(R, a.out - (i + R)));
  for (int k = 0; k < rows; ++k) {
    if (NP == 0 && lead) {
      const T* row = w + (R + k) * a.ldw;
      for (int64_t c = c0 & ~(kLine - 1); c < c1; c += kLine) __builtin_prefetch(row + c, 0, 2);
    }
    for (int p = 0; p < NP; ++p) {
      if (tm[k][p].scale) __builtin_prefetch(tm[k][p].bits + R * a.signs.nb + (c0 >> 3), 0, 2);
    }
  }
}

// Weight rows i .. i+R-1 against one chunk; `lead`: the first chunk of the pass over these rows.
// XT: float (x rows in fp32) or uint16_t (x rows in bf16, for the bf16 dot-product span).
template <class Tag, int R, int NR, int NP, class XT>
void gemv_chunk(const GemvArgs& a, const typename Tag::T* w, int64_t i, bool lead,
                const Chunk& ch) {
  static_assert(NR >= 1 && (NP == 0 || NP == NR || NR == 1), "unsupported chunk shape");
  using F = typename Simd::F;
  constexpr int NPP = NP > 0 ? NP : 1;
  const SignSet& s = a.signs;
  constexpr bool kBf16x = same_v<XT, uint16_t>;
  const int64_t ldx = kBf16x ? a.ldxb : a.ldx;
  const XT* x = kBf16x ? reinterpret_cast<const XT*>(a.xb) + ch.row * ldx
                       : reinterpret_cast<const XT*>(a.x) + ch.row * ldx;

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
  // The next pass's weight rows, for gemv_span to request one line per block (clamped to the
  // last row; null where this chunk does not request them, see prefetch_next).
  const typename Tag::T* next[R];
  const int64_t next_rows = min64(R, a.out - (i + R));
  for (int k = 0; k < R; ++k) next[k] = w + (R + min64(k, next_rows - 1)) * a.ldw;
  const typename Tag::T* const* next_w = NP > 0 && lead && next_rows > 0 ? next : nullptr;
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
    for (int64_t s0 = c0, s1; s0 < c1; s0 = s1) {
      s1 = min64(c1, (s0 / kStrip + 1) * kStrip);
      prefetch_next<Tag, R, NP>(a, w, i, lead, tm, s0, s1);
      if ((s0 & 7) == 0) {
        gemv_span<Tag, R, NR, NP, true>(w, a.ldw, x, ldx, tm, s.nb, s0, s1, acc, sacc, next_w);
      } else {
        gemv_span<Tag, R, NR, NP, false>(w, a.ldw, x, ldx, tm, s.nb, s0, s1, acc, sacc, next_w);
      }
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
using ChunkFn = void (*)(const GemvArgs&, const typename Tag::T*, int64_t, bool, const Chunk&);

// Weight rows per pass: four where the ISA has the registers (AVX-512: 32), else two. More rows
// per pass means more memory streams in flight, which is what a one-row (decoding) GEMV is
// bound by: bf16 N=1, 4096x4096, 2 cores: 1.1-1.2 ms with two rows, 0.9-1.0 ms with four.
#ifndef QMERGE_ISA_MAX_ROWS
#define QMERGE_ISA_MAX_ROWS 2
#endif
constexpr int kMaxRows = QMERGE_ISA_MAX_ROWS;

// Whether R weight rows of an (NR, NP) chunk keep their R * (NR + NP) accumulators, R weight
// vectors and NR x vectors in registers: four rows only for the small chunks.
constexpr bool fits(int r, int nr, int np) { return r <= 2 || nr + np <= 4; }

template <class Tag, int R, int NR, int NP, class XT>
ChunkFn<Tag> chunk_ptr() {
  if constexpr (fits(R, NR, NP)) {
    return &gemv_chunk<Tag, R, NR, NP, XT>;
  } else {
    return nullptr;
  }
}

// The chunk shapes the host (csrc/cpu/routing.cpp) builds: (k, 0) for k <= 8, (k, k) for
// k <= 4, (1, k) for k <= 8; each for R = kMaxRows, 2 and 1 weight rows (null where the
// chunk does not fit R rows).
template <class Tag, int R, class XT>
ChunkFn<Tag> chunk_fn(int nr, int np) {
#define QM_SHAPE(NR, NP) \
  case (NR) * 16 + (NP): return chunk_ptr<Tag, R, NR, NP, XT>();
  // clang-format off: one case per macro, laid out as the table of chunk shapes
  switch (nr * 16 + np) {
    QM_SHAPE(1, 0) QM_SHAPE(2, 0) QM_SHAPE(3, 0) QM_SHAPE(4, 0)
    QM_SHAPE(5, 0) QM_SHAPE(6, 0) QM_SHAPE(7, 0) QM_SHAPE(8, 0)
    QM_SHAPE(1, 1) QM_SHAPE(2, 2) QM_SHAPE(3, 3) QM_SHAPE(4, 4)
    QM_SHAPE(1, 2) QM_SHAPE(1, 3) QM_SHAPE(1, 4)
    QM_SHAPE(1, 5) QM_SHAPE(1, 6) QM_SHAPE(1, 7) QM_SHAPE(1, 8)
    default:
      return nullptr;
  }
  // clang-format on
#undef QM_SHAPE
}

// Rows [i0, i1) in passes of kMaxRows: every chunk that fits runs on the pass's rows at once;
// the others run two rows at a time (one for an odd last row), all chunks on a pair before the
// next pair, so the pair's weights are still in L1 for every chunk after the first.
template <class Tag, class XT>
void gemv_rows_x(const GemvArgs& a, int64_t i0, int64_t i1) {
  using T = typename Tag::T;
  struct Fns {
    ChunkFn<Tag> wide, pair, one;
  };
  auto fns_of = [](const Chunk& ch) {
    return Fns{kMaxRows > 2 ? chunk_fn<Tag, kMaxRows, XT>(ch.nr, ch.np) : nullptr,
               chunk_fn<Tag, 2, XT>(ch.nr, ch.np), chunk_fn<Tag, 1, XT>(ch.nr, ch.np)};
  };
  constexpr int64_t kCached = 64;
  Fns cache[kCached];
  const int64_t cached = min64(a.nchunks, kCached);
  for (int64_t k = 0; k < cached; ++k) cache[k] = fns_of(a.chunks[k]);
  auto fns = [&](int64_t k) { return k < cached ? cache[k] : fns_of(a.chunks[k]); };
  for (int64_t i = i0; i < i1; i += kMaxRows) {
    const int64_t n = min64(kMaxRows, i1 - i);
    const T* w = static_cast<const T*>(a.w) + i * a.ldw;
    bool narrow = false, lead = true;
    for (int64_t k = 0; k < a.nchunks; ++k) {
      const Fns f = fns(k);
      if (n == kMaxRows && f.wide) {
        f.wide(a, w, i, lead, a.chunks[k]);
        lead = false;
      } else {
        narrow = true;
      }
    }
    if (!narrow) continue;
    for (int64_t j = 0; j < n; j += 2) {
      lead = true;
      for (int64_t k = 0; k < a.nchunks; ++k) {
        const Fns f = fns(k);
        if (n == kMaxRows && f.wide) continue;
        if (j + 1 < n) {
          f.pair(a, w + j * a.ldw, i + j, lead, a.chunks[k]);
        } else {
          f.one(a, w + j * a.ldw, i + j, lead, a.chunks[k]);
        }
        lead = false;
      }
    }
  }
}

template <class Tag>
void gemv_rows(const GemvArgs& a, int64_t i0, int64_t i1) {
#ifdef QMERGE_ISA_BF16DOT
  if constexpr (same_v<Tag, TagBF16>) {
    if (a.xb) return gemv_rows_x<Tag, uint16_t>(a, i0, i1);
  }
#endif
  gemv_rows_x<Tag, float>(a, i0, i1);
}

}  // namespace qmerge::cpu::QMERGE_ISA
