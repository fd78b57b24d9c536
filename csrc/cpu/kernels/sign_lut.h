// The table-lookup kernel for the sign terms of mixed batches (LutArgs in kernels.h).
//
// AVX-512 (QMERGE_ISA_LUT512): lanes are 32 consecutive outputs. One 16-bit word of bits per
// output holds 3 groups of 5 columns; vpermw reads only the low 5 bits of each lane, so the
// word, the word >> 5 and the word >> 10 index the three groups' tables with no masking. A pass
// holds R <= 4 pairs of one task and A <= 4 tiles (16 int16 accumulators), so each table load
// serves A tiles and each word R pairs. Groups of 5 need 20% fewer lookups than nibbles (groups
// of 4), and the lookups (vpermw + vpaddw) bound the kernel (bench/results/kernels-cpu-notes.md).
// Elsewhere the portable loop computes the same integers one output at a time.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qmerge::cpu::QMERGE_ISA {

// acc[p, i] for pair p, outputs of tiles [tile0, tile1), one lookup per group (exact in int32).
inline void sign_lut_portable(const LutArgs& a, int64_t p, int64_t tile0, int64_t tile1) {
  const uint16_t* idx = a.idx + int64_t(a.pair_task[p]) * a.tiles * a.nw * kLutTile;
  const int16_t* tab = a.tables + int64_t(a.pair_row[p]) * 3 * a.nw * 32;
  int32_t* acc = a.acc + p * a.tiles * kLutTile;
  for (int64_t t = tile0; t < tile1; ++t) {
    const uint16_t* tile = idx + t * a.nw * kLutTile;
    for (int o = 0; o < kLutTile; ++o) {
      int32_t sum = 0;
      for (int64_t w = 0; w < a.nw; ++w) {
        const uint16_t word = tile[w * kLutTile + o];
        for (int j = 0; j < 3; ++j) sum += tab[(3 * w + j) * 32 + ((word >> (5 * j)) & 31)];
      }
      acc[t * kLutTile + o] = sum;
    }
  }
}

#ifdef QMERGE_ISA_LUT512

inline void group_tables(const int16_t* q, int64_t groups, int16_t* tab) {
  __m512i pat[5];  // pat[j][e] = +1 where bit j of e is set, else -1
  for (int j = 0; j < 5; ++j) {
    alignas(64) int16_t p[32];
    for (int e = 0; e < 32; ++e) p[e] = ((e >> j) & 1) ? 1 : -1;
    pat[j] = _mm512_load_si512(p);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* qg = q + 5 * g;
    __m512i t = _mm512_mullo_epi16(pat[0], _mm512_set1_epi16(qg[0]));
    for (int j = 1; j < 5; ++j) {
      t = _mm512_add_epi16(t, _mm512_mullo_epi16(pat[j], _mm512_set1_epi16(qg[j])));
    }
    _mm512_storeu_si512(tab + g * 32, t);
  }
}

#else

inline void group_tables(const int16_t* q, int64_t groups, int16_t* tab) {
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* qg = q + 5 * g;
    int16_t* t = tab + g * 32;
    t[0] = int16_t(-qg[0] - qg[1] - qg[2] - qg[3] - qg[4]);
    for (int j = 0; j < 5; ++j) {  // entries with bit j set: the ones without it, + 2 q_j
      for (int e = 0; e < (1 << j); ++e) t[e + (1 << j)] = int16_t(t[e] + 2 * qg[j]);
    }
  }
}

#endif

// xs[0, count) = x[row, c0 + ...] as fp32 (zeros past `in`), in a form the compiler vectorizes.
inline void lut_load(const LutTableArgs& a, int64_t row, int64_t c0, int64_t count, float* xs) {
  const int64_t have = a.in - c0 < count ? (a.in - c0 > 0 ? a.in - c0 : 0) : count;
  if (a.x) {
    const float* src = a.x + row * a.ldx + c0;
    for (int64_t c = 0; c < have; ++c) xs[c] = src[c];
  } else {
    const uint16_t* src = a.xb + row * a.ldx + c0;
    uint32_t* dst = reinterpret_cast<uint32_t*>(xs);  // bf16 -> fp32: the upper half
    for (int64_t c = 0; c < have; ++c) dst[c] = uint32_t(src[c]) << 16;
  }
  for (int64_t c = have; c < count; ++c) xs[c] = 0.0f;
}

// q[c] = round(clamp(xs[c] * inv, -127, 127)), half to even: |x * inv| <= 127 up to one
// rounding of the product, hence the clamp.
inline int16_t quantize_one(float x, float inv) {
  float v = x * inv;
  v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
  return int16_t(__builtin_nearbyintf(v));
}

#ifdef QMERGE_ISA_LUT512

inline float abs_max(const float* xs, int64_t n, float m) {
  __m512 acc = _mm512_set1_ps(m);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) acc = _mm512_max_ps(acc, _mm512_abs_ps(_mm512_loadu_ps(xs + c)));
  m = _mm512_reduce_max_ps(acc);
  for (; c < n; ++c) m = xs[c] > m ? xs[c] : (-xs[c] > m ? -xs[c] : m);
  return m;
}

inline void quantize(const float* xs, int64_t n, float inv, int16_t* q) {
  const __m512 vinv = _mm512_set1_ps(inv), hi = _mm512_set1_ps(127.0f),
               lo = _mm512_set1_ps(-127.0f);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v =
        _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(xs + c), vinv)));
    const __m512i i = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm512_cvtepi32_epi16(i));
  }
  for (; c < n; ++c) q[c] = quantize_one(xs[c], inv);
}

#else

inline float abs_max(const float* xs, int64_t n, float m) {
  for (int64_t c = 0; c < n; ++c) m = xs[c] > m ? xs[c] : (-xs[c] > m ? -xs[c] : m);
  return m;
}

inline void quantize(const float* xs, int64_t n, float inv, int16_t* q) {
  for (int64_t c = 0; c < n; ++c) q[c] = quantize_one(xs[c], inv);
}

#endif

inline void lut_tables(const LutTableArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t kSlice = 3840;  // columns per slice of a row: whole words (15 columns)
  int16_t q[kSlice];
  float xs[kSlice];
  const int64_t cols_all = a.nw * 15;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = a.rows[n];
    float m = 0.0f;
    for (int64_t c0 = 0; c0 < cols_all; c0 += kSlice) {
      const int64_t cols = cols_all - c0 < kSlice ? cols_all - c0 : kSlice;
      lut_load(a, row, c0, cols, xs);
      m = abs_max(xs, cols, m);
    }
    a.d[n] = m / 127.0f;
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    int16_t* tab = a.tables + n * 3 * a.nw * 32;
    for (int64_t c0 = 0; c0 < cols_all; c0 += kSlice) {
      const int64_t cols = cols_all - c0 < kSlice ? cols_all - c0 : kSlice;
      lut_load(a, row, c0, cols, xs);
      quantize(xs, cols, inv, q);
      group_tables(q, cols / 5, tab + (c0 / 5) * 32);
    }
  }
}

#ifdef QMERGE_ISA_LUT512

// R pairs (p0 .. p0+R-1, one task) x A tiles starting at `tile`.
//
// The bits stream from memory (a task's are 1/15 of a bf16 weight, long evicted by the base
// GEMM): each step of w requests the same step of the next block's bits, so memory time hides
// under the lookups instead of adding to them.
template <int R, int A>
inline void sign_lut_block(const LutArgs& a, int64_t p0, int64_t tile, int64_t next_tiles) {
  const uint16_t* idx = a.idx + (int64_t(a.pair_task[p0]) * a.tiles + tile) * a.nw * kLutTile;
  const uint16_t* next = idx + A * a.nw * kLutTile;
  const int16_t* tab[R];
  int32_t* acc[R];
  for (int r = 0; r < R; ++r) {
    tab[r] = a.tables + int64_t(a.pair_row[p0 + r]) * 3 * a.nw * 32;
    acc[r] = a.acc + (p0 + r) * a.tiles * kLutTile + tile * kLutTile;
    for (int k = 0; k < A * kLutTile; ++k) acc[r][k] = 0;
  }
  for (int64_t w0 = 0; w0 < a.nw; w0 += kLutFlushWords) {
    const int64_t w1 = w0 + kLutFlushWords < a.nw ? w0 + kLutFlushWords : a.nw;
    __m512i s[R][A];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < A; ++t) s[r][t] = _mm512_setzero_si512();
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = 0; t < next_tiles; ++t) {
        __builtin_prefetch(next + (t * a.nw + w) * kLutTile, 0, 3);
      }
      __m512i word[A];
      for (int t = 0; t < A; ++t) word[t] = _mm512_loadu_si512(idx + (t * a.nw + w) * kLutTile);
      // One group at a time: 16 accumulators + 4 words + 4 indices + a table fit the 32
      // registers (all three groups' indices at once spilled to the stack).
      for (int j = 0; j < 3; ++j) {
        __m512i ix[A];
        for (int t = 0; t < A; ++t) {
          ix[t] = j == 0 ? word[t] : _mm512_srli_epi16(word[t], unsigned(5 * j));
        }
        for (int r = 0; r < R; ++r) {
          const __m512i tj = _mm512_loadu_si512(tab[r] + (3 * w + j) * 32);
          for (int t = 0; t < A; ++t) {
            s[r][t] = _mm512_add_epi16(s[r][t], _mm512_permutexvar_epi16(ix[t], tj));
            // Keeps each sum in its register here: otherwise GCC reassociates the integer
            // adds, computes every lookup of a word first and spills them to the stack.
            __asm__("" : "+v"(s[r][t]));
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < A; ++t) {
        int32_t* dst = acc[r] + t * kLutTile;
        const __m512i v0 = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s[r][t]));
        const __m512i v1 = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s[r][t], 1));
        _mm512_storeu_si512(dst, _mm512_add_epi32(_mm512_loadu_si512(dst), v0));
        _mm512_storeu_si512(dst + 16, _mm512_add_epi32(_mm512_loadu_si512(dst + 16), v1));
      }
    }
  }
}

template <int R>
inline void sign_lut_rows(const LutArgs& a, int64_t p0, int64_t tile0, int64_t tile1) {
  int64_t t = tile0;
  for (; t + 4 <= tile1; t += 4) {
    sign_lut_block<R, 4>(a, p0, t, tile1 - (t + 4) < 4 ? tile1 - (t + 4) : 4);
  }
  switch (tile1 - t) {
    case 3: return sign_lut_block<R, 3>(a, p0, t, 0);
    case 2: return sign_lut_block<R, 2>(a, p0, t, 0);
    case 1: return sign_lut_block<R, 1>(a, p0, t, 0);
    default: return;
  }
}

inline void sign_lut(const LutArgs& a, int64_t tile0, int64_t tile1) {
  int64_t p = 0;
  while (p < a.pairs) {
    int64_t r = 1;
    while (r < kLutMaxRows && p + r < a.pairs && a.pair_task[p + r] == a.pair_task[p]) ++r;
    switch (r) {
      case 4: sign_lut_rows<4>(a, p, tile0, tile1); break;
      case 3: sign_lut_rows<3>(a, p, tile0, tile1); break;
      case 2: sign_lut_rows<2>(a, p, tile0, tile1); break;
      default: sign_lut_rows<1>(a, p, tile0, tile1); break;
    }
    p += r;
  }
}

#else

inline void sign_lut(const LutArgs& a, int64_t tile0, int64_t tile1) {
  for (int64_t p = 0; p < a.pairs; ++p) sign_lut_portable(a, p, tile0, tile1);
}

#endif

}  // namespace qmerge::cpu::QMERGE_ISA
