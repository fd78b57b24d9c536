// The table-lookup kernel for the sign terms of mixed batches (LutArgs in kernels.h).
//
// AVX-512 (QMERGE_ISA_LUT512): lanes are 32 consecutive outputs. One byte of bits per output
// (8 columns, two groups of 4) is widened to a 16-bit lane; vpermw looks the low nibble up in
// the first group's table (the high bit it also reads picks the table's second copy) and the
// byte shifted right by 4 in the second group's. A pass holds R <= 4 pairs of one task and A <= 4
// tiles (16 int16 accumulators), so each table load serves A tiles and each index byte R pairs.
// Elsewhere the portable loop computes the same integers one output at a time.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qmerge::cpu::QMERGE_ISA {

// acc[p, i] for pair p, outputs of tiles [tile0, tile1), one lookup per nibble (exact in int32).
inline void sign_lut_portable(const LutArgs& a, int64_t p, int64_t tile0, int64_t tile1) {
  const uint8_t* idx = a.idx + int64_t(a.pair_task[p]) * a.tiles * a.nb * kLutTile;
  const int16_t* tab = a.tables + int64_t(a.pair_row[p]) * 2 * a.nb * 32;
  int32_t* acc = a.acc + p * a.tiles * kLutTile;
  for (int64_t t = tile0; t < tile1; ++t) {
    const uint8_t* tile = idx + t * a.nb * kLutTile;
    for (int o = 0; o < kLutTile; ++o) {
      int32_t sum = 0;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t byte = tile[b * kLutTile + o];
        sum += tab[(2 * b) * 32 + (byte & 15)] + tab[(2 * b + 1) * 32 + (byte >> 4)];
      }
      acc[t * kLutTile + o] = sum;
    }
  }
}

#ifdef QMERGE_ISA_LUT512

inline void group_tables(const int16_t* q, int64_t groups, int16_t* tab) {
  // pattern[j][e] = +1 where bit j of e (mod 16) is set, else -1.
  __m512i pat[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) int16_t p[32];
    for (int e = 0; e < 32; ++e) p[e] = ((e >> j) & 1) ? 1 : -1;
    pat[j] = _mm512_load_si512(p);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* qg = q + 4 * g;
    __m512i t = _mm512_mullo_epi16(pat[0], _mm512_set1_epi16(qg[0]));
    for (int j = 1; j < 4; ++j) {
      t = _mm512_add_epi16(t, _mm512_mullo_epi16(pat[j], _mm512_set1_epi16(qg[j])));
    }
    _mm512_storeu_si512(tab + g * 32, t);
  }
}

#else

inline void group_tables(const int16_t* q, int64_t groups, int16_t* tab) {
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* qg = q + 4 * g;
    int16_t* t = tab + g * 32;
    t[0] = int16_t(-qg[0] - qg[1] - qg[2] - qg[3]);
    for (int j = 0; j < 4; ++j) {  // entries with bit j set: the ones without it, + 2 q_j
      for (int e = 0; e < (1 << j); ++e) t[e + (1 << j)] = int16_t(t[e] + 2 * qg[j]);
    }
    for (int e = 0; e < 16; ++e) t[e + 16] = t[e];
  }
}

#endif

inline void lut_tables(const LutTableArgs& a, int64_t n0, int64_t n1) {
  int16_t q[4096];  // columns per slice of a row, a multiple of 8 (whole bytes of bits)
  constexpr int64_t kSlice = 4096;
  for (int64_t n = n0; n < n1; ++n) {
    const float* x = a.x + n * a.in;
    float m = 0.0f;
    for (int64_t c = 0; c < a.in; ++c) m = x[c] > m ? x[c] : (-x[c] > m ? -x[c] : m);
    a.d[n] = m / 127.0f;
    const float inv = m > 0.0f ? 127.0f / m : 0.0f;
    int16_t* tab = a.tables + n * 2 * a.nb * 32;
    for (int64_t c0 = 0; c0 < a.nb * 8; c0 += kSlice) {
      const int64_t cols = a.nb * 8 - c0 < kSlice ? a.nb * 8 - c0 : kSlice;
      for (int64_t c = 0; c < cols; ++c) {
        // |x * inv| <= 127 up to one rounding of the product: clamp, then round half to even.
        float v = c0 + c < a.in ? x[c0 + c] * inv : 0.0f;
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[c] = int16_t(__builtin_nearbyintf(v));
      }
      group_tables(q, cols / 4, tab + (c0 / 4) * 32);
    }
  }
}

#ifdef QMERGE_ISA_LUT512

// R pairs (p0 .. p0+R-1, one task) x A tiles starting at `tile`.
// The bits stream from memory (a task's are 1/16 of a bf16 weight, long evicted by the base
// GEMM): each step of b requests the same step of the next block's bits, so memory time hides
// under the lookups instead of adding to them (the hardware prefetchers do not run far enough
// ahead of four interleaved streams).
template <int R, int A>
inline void sign_lut_block(const LutArgs& a, int64_t p0, int64_t tile, int64_t next_tiles) {
  const uint8_t* idx = a.idx + (int64_t(a.pair_task[p0]) * a.tiles + tile) * a.nb * kLutTile;
  const uint8_t* next = idx + A * a.nb * kLutTile;
  const int16_t* tab[R];
  int32_t* acc[R];
  for (int r = 0; r < R; ++r) {
    tab[r] = a.tables + int64_t(a.pair_row[p0 + r]) * 2 * a.nb * 32;
    acc[r] = a.acc + (p0 + r) * a.tiles * kLutTile + tile * kLutTile;
    for (int k = 0; k < A * kLutTile; ++k) acc[r][k] = 0;
  }
  for (int64_t b0 = 0; b0 < a.nb; b0 += kLutFlushBytes) {
    const int64_t b1 = b0 + kLutFlushBytes < a.nb ? b0 + kLutFlushBytes : a.nb;
    __m512i s[R][A];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < A; ++t) s[r][t] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      __m512i lo[A], hi[A];
      for (int64_t t = 0; t < next_tiles; ++t) {
        __builtin_prefetch(next + (t * a.nb + b) * kLutTile, 0, 3);
      }
      for (int t = 0; t < A; ++t) {
        const uint8_t* src = idx + (t * a.nb + b) * kLutTile;
        lo[t] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        hi[t] = _mm512_srli_epi16(lo[t], 4);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i t0 = _mm512_loadu_si512(tab[r] + (2 * b) * 32);
        const __m512i t1 = _mm512_loadu_si512(tab[r] + (2 * b + 1) * 32);
        for (int t = 0; t < A; ++t) {
          s[r][t] = _mm512_add_epi16(s[r][t], _mm512_permutexvar_epi16(lo[t], t0));
          s[r][t] = _mm512_add_epi16(s[r][t], _mm512_permutexvar_epi16(hi[t], t1));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < A; ++t) {
        int32_t* dst = acc[r] + t * kLutTile;
        const __m512i w0 = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(s[r][t]));
        const __m512i w1 = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(s[r][t], 1));
        _mm512_storeu_si512(dst, _mm512_add_epi32(_mm512_loadu_si512(dst), w0));
        _mm512_storeu_si512(dst + 16, _mm512_add_epi32(_mm512_loadu_si512(dst + 16), w1));
      }
    }
  }
}

template <int R>
inline void sign_lut_rows(const LutArgs& a, int64_t p0, int64_t tile0, int64_t tile1) {
  int64_t t = tile0;
  for (; t + 4 <= tile1; t += 4)
    sign_lut_block<R, 4>(a, p0, t, tile1 - (t + 4) < 4 ? tile1 - (t + 4) : 4);
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
