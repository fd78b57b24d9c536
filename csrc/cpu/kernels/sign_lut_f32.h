// The table-lookup kernel for the sign terms of fp32 activations (LutF32Args in kernels.h).
//
// AVX-512 (QMERGE_ISA_LUT512): a tile's 32 outputs are two vectors of 16 lanes. One 32-bit word
// of bits per output holds 8 groups of 4 columns; vpermps reads only the low 4 bits of each
// lane, so the word >> 4j indexes group j's table with no masking. A pass holds R <= 4 pairs of
// one task and A <= 2 tiles (16 fp32 accumulators), so each table load serves A tiles and each
// word R pairs. Against the int16 kernel (sign_lut.h) a lookup covers 16 outputs x 4 columns
// instead of 32 x 5: 2.5x the lookups for the same term, the price of not quantizing x.
// Elsewhere the portable loop adds the same values in the same order, one output at a time.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qmerge::cpu::QMERGE_ISA {

// acc[p, i] for pair p, outputs of tiles [tile0, tile1): the groups' entries in column order.
inline void sign_lut_f32_portable(const LutF32Args& a, int64_t p, int64_t tile0, int64_t tile1) {
  const uint32_t* idx = a.idx + int64_t(a.pair_task[p]) * a.tiles * a.nw * kLutTile;
  const float* tab = a.tables + int64_t(a.pair_row[p]) * 8 * a.nw * 16;
  float* acc = a.acc + p * a.tiles * kLutTile;
  for (int64_t t = tile0; t < tile1; ++t) {
    const uint32_t* tile = idx + t * a.nw * kLutTile;
    for (int o = 0; o < kLutTile; ++o) {
      float sum = 0.0f;
      for (int64_t w = 0; w < a.nw; ++w) {
        const uint32_t word = tile[w * kLutTile + o];
        for (int j = 0; j < 8; ++j) sum += tab[(8 * w + j) * 16 + ((word >> (4 * j)) & 15)];
      }
      acc[t * kLutTile + o] = sum;
    }
  }
}

// x[row, 4g .. 4g+3] as fp32, zeros past `in`.
inline void lut_f32_group(const LutF32TableArgs& a, const float* x, int64_t g, float (&v)[4]) {
  for (int j = 0; j < 4; ++j) v[j] = 4 * g + j < a.in ? x[4 * g + j] : 0.0f;
}

#ifdef QMERGE_ISA_LUT512

inline void lut_tables_f32(const LutF32TableArgs& a, int64_t n0, int64_t n1) {
  __m512 pat[4];  // pat[j][e] = +1 where bit j of e is set, else -1
  for (int j = 0; j < 4; ++j) {
    alignas(64) float p[16];
    for (int e = 0; e < 16; ++e) p[e] = ((e >> j) & 1) ? 1.0f : -1.0f;
    pat[j] = _mm512_load_ps(p);
  }
  for (int64_t n = n0; n < n1; ++n) {
    const float* x = a.x + a.rows[n] * a.ldx;
    float* tab = a.tables + n * 8 * a.nw * 16;
    // +-x0, then each +-x_j added in order (a multiply by +-1 is exact: the fma rounds once,
    // as the portable add does)
    auto group = [&](const float* v, int64_t g) {
      __m512 t = _mm512_mul_ps(pat[0], _mm512_set1_ps(v[0]));
      for (int j = 1; j < 4; ++j) t = _mm512_fmadd_ps(pat[j], _mm512_set1_ps(v[j]), t);
      _mm512_storeu_ps(tab + g * 16, t);
    };
    const int64_t full = a.in / 4;  // groups with every column inside `in`
    for (int64_t g = 0; g < full; ++g) {
      __builtin_prefetch(tab + (g + 16) * 16, 1, 3);
      group(x + 4 * g, g);
    }
    for (int64_t g = full; g < 8 * a.nw; ++g) {
      float v[4];
      lut_f32_group(a, x, g, v);
      group(v, g);
    }
  }
}

// R pairs (p0 .. p0+R-1, one task) x A tiles starting at `tile`; the next block's bits are
// requested a word ahead, as in sign_lut_block.
template <int R, int A>
inline void sign_lut_f32_block(const LutF32Args& a, int64_t p0, int64_t tile, int64_t next_tiles) {
  const uint32_t* idx = a.idx + (int64_t(a.pair_task[p0]) * a.tiles + tile) * a.nw * kLutTile;
  const uint32_t* next = idx + A * a.nw * kLutTile;
  const float* tab[R];
  for (int r = 0; r < R; ++r) tab[r] = a.tables + int64_t(a.pair_row[p0 + r]) * 8 * a.nw * 16;
  __m512 s[R][A][2];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < A; ++t) s[r][t][0] = s[r][t][1] = _mm512_setzero_ps();
  for (int64_t w = 0; w < a.nw; ++w) {
    for (int64_t t = 0; t < next_tiles; ++t) {
      __builtin_prefetch(next + (t * a.nw + w) * kLutTile, 0, 3);
      __builtin_prefetch(next + (t * a.nw + w) * kLutTile + 16, 0, 3);
    }
    __m512i word[A][2];
    for (int t = 0; t < A; ++t) {
      word[t][0] = _mm512_loadu_si512(idx + (t * a.nw + w) * kLutTile);
      word[t][1] = _mm512_loadu_si512(idx + (t * a.nw + w) * kLutTile + 16);
    }
    for (int j = 0; j < 8; ++j) {
      __m512i ix[A][2];
      for (int t = 0; t < A; ++t) {
        for (int h = 0; h < 2; ++h) {
          ix[t][h] = j == 0 ? word[t][h] : _mm512_srli_epi32(word[t][h], unsigned(4 * j));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 tj = _mm512_loadu_ps(tab[r] + (8 * w + j) * 16);
        for (int t = 0; t < A; ++t) {
          for (int h = 0; h < 2; ++h) {
            s[r][t][h] = _mm512_add_ps(s[r][t][h], _mm512_permutexvar_ps(ix[t][h], tj));
            __asm__("" : "+v"(s[r][t][h]));  // each sum stays in its register (sign_lut.h)
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float* dst = a.acc + (p0 + r) * a.tiles * kLutTile + tile * kLutTile;
    for (int t = 0; t < A; ++t) {
      _mm512_storeu_ps(dst + t * kLutTile, s[r][t][0]);
      _mm512_storeu_ps(dst + t * kLutTile + 16, s[r][t][1]);
    }
  }
}

template <int R>
inline void sign_lut_f32_rows(const LutF32Args& a, int64_t p0, int64_t tile0, int64_t tile1) {
  int64_t t = tile0;
  for (; t + 2 <= tile1; t += 2) {
    sign_lut_f32_block<R, 2>(a, p0, t, tile1 - (t + 2) < 2 ? tile1 - (t + 2) : 2);
  }
  if (t < tile1) sign_lut_f32_block<R, 1>(a, p0, t, 0);
}

inline void sign_lut_f32(const LutF32Args& a, int64_t tile0, int64_t tile1) {
  int64_t p = 0;
  while (p < a.pairs) {
    int64_t r = 1;
    while (r < kLutMaxRows && p + r < a.pairs && a.pair_task[p + r] == a.pair_task[p]) ++r;
    switch (r) {
      case 4: sign_lut_f32_rows<4>(a, p, tile0, tile1); break;
      case 3: sign_lut_f32_rows<3>(a, p, tile0, tile1); break;
      case 2: sign_lut_f32_rows<2>(a, p, tile0, tile1); break;
      default: sign_lut_f32_rows<1>(a, p, tile0, tile1); break;
    }
    p += r;
  }
}

#else

inline void lut_tables_f32(const LutF32TableArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* x = a.x + a.rows[n] * a.ldx;
    float* tab = a.tables + n * 8 * a.nw * 16;
    for (int64_t g = 0; g < 8 * a.nw; ++g) {
      float v[4];
      lut_f32_group(a, x, g, v);
      for (int e = 0; e < 16; ++e) {
        float t = (e & 1) ? v[0] : -v[0];
        for (int j = 1; j < 4; ++j) t += ((e >> j) & 1) ? v[j] : -v[j];
        tab[g * 16 + e] = t;
      }
    }
  }
}

inline void sign_lut_f32(const LutF32Args& a, int64_t tile0, int64_t tile1) {
  for (int64_t p = 0; p < a.pairs; ++p) sign_lut_f32_portable(a, p, tile0, tile1);
}

#endif

}  // namespace qmerge::cpu::QMERGE_ISA
