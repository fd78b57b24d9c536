// AVX-512 (F, BW, VL, DQ) vector of 16 fp32 lanes. Included only by isa_avx512.cpp, after its
// target pragma. Members match simd/avx2.h and simd/scalar.h; kernels/*.h are written against them.
#pragma once

#include "kernels/tags.h"

namespace qmerge::cpu::QMERGE_ISA {

struct Simd {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;

  static M first(int n) { return static_cast<M>((1u << n) - 1u); }

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }

  // --- loads (n < W: the first n lanes, the rest zero) and stores of each element type
  static F load(TagF32, const float* p) { return _mm512_loadu_ps(p); }
  static F load(TagF32, const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static F load(TagF16, const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(TagF16, const uint16_t* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p));
  }
  static F bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load(TagBF16, const uint16_t* p) {
    return bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load(TagBF16, const uint16_t* p, int n) {
    return bf16_to_f32(_mm256_maskz_loadu_epi16(first(n), p));
  }

  static void store(TagF32, float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(TagF32, float* p, F v, int n) { _mm512_mask_storeu_ps(p, first(n), v); }
  static __m256i f32_to_f16(F v) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(TagF16, uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f32_to_f16(v));
  }
  static void store(TagF16, uint16_t* p, F v, int n) {
    _mm256_mask_storeu_epi16(p, first(n), f32_to_f16(v));
  }
  // Round to nearest even, NaN -> quiet NaN (c10::BFloat16's rule).
  static __m256i f32_to_bf16(F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static void store(TagBF16, uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f32_to_bf16(v));
  }
  static void store(TagBF16, uint16_t* p, F v, int n) {
    _mm256_mask_storeu_epi16(p, first(n), f32_to_bf16(v));
  }
  // Non-temporal stores of a full vector (p aligned to W * sizeof(T) bytes): they skip the
  // read-for-ownership of the destination line. fence() orders them before the thread ends.
  static void stream(TagF32, float* p, F v) { _mm512_stream_ps(p, v); }
  static void stream(TagF16, uint16_t* p, F v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f32_to_f16(v));
  }
  static void stream(TagBF16, uint16_t* p, F v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f32_to_bf16(v));
  }
  static void fence() { _mm_sfence(); }

  // --- sign bits. `bits` holds one bit per lane, lane 0 in bit 0.
  static M mask(uint32_t bits) { return static_cast<M>(bits); }
  // The W bits of a full block at column c, c a multiple of 8.
  static uint32_t bits_full(const uint8_t* row, int64_t c) {
    uint16_t v;
    __builtin_memcpy(&v, row + (c >> 3), 2);
    return v;
  }
  // The mask of a full block at column c (a multiple of 8), loaded straight into a mask
  // register (kmovw k, m16) instead of through a general register.
  static M mask_full(const uint8_t* row, int64_t c) {
    return _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(row + (c >> 3))));
  }
  static F mask_add(F acc, M m, F x) { return _mm512_mask_add_ps(acc, m, acc, x); }
  // m ? a : -a, where -a flips the sign bit exactly as a * -1 does.
  static F pm(M m, F a) {
    const F neg = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u))));
    return _mm512_mask_blend_ps(m, neg, a);
  }
  static F blend(M m, F if0, F if1) { return _mm512_mask_blend_ps(m, if0, if1); }
  static uint32_t ge0(F v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ); }
};

}  // namespace qmerge::cpu::QMERGE_ISA
