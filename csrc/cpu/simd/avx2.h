// AVX2 + FMA + F16C vector of 8 fp32 lanes. Included only by isa_avx2.cpp, after its target
// pragma. Partial loads and stores go through a small stack buffer (AVX2 has no 16-bit masks).
#pragma once

#include "kernels/tags.h"

namespace qmerge::cpu::QMERGE_ISA {

struct Simd {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;  // all-ones lanes where the bit is set

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  static F load(TagF32, const float* p) { return _mm256_loadu_ps(p); }
  static F load(TagF16, const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F load(TagBF16, const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  template <class Tag>
  static F load(Tag tag, const typename Tag::T* p, int n) {
    typename Tag::T buf[W] = {};
    __builtin_memcpy(buf, p, sizeof(buf[0]) * n);
    return load(tag, buf);
  }

  static void store(TagF32, float* p, F v) { _mm256_storeu_ps(p, v); }
  static __m128i f32_to_f16(F v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(TagF16, uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f32_to_f16(v));
  }
  // Round to nearest even, NaN -> quiet NaN (c10::BFloat16's rule).
  static __m128i f32_to_bf16(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_srli_epi32(r, 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(TagBF16, uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f32_to_bf16(v));
  }
  template <class Tag>
  static void store(Tag tag, typename Tag::T* p, F v, int n) {
    typename Tag::T buf[W];
    store(tag, buf, v);
    __builtin_memcpy(p, buf, sizeof(buf[0]) * n);
  }
  // Non-temporal stores of a full vector (p aligned to W * sizeof(T) bytes), then fence().
  static void stream(TagF32, float* p, F v) { _mm256_stream_ps(p, v); }
  static void stream(TagF16, uint16_t* p, F v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), f32_to_f16(v));
  }
  static void stream(TagBF16, uint16_t* p, F v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), f32_to_bf16(v));
  }
  static void fence() { _mm_sfence(); }

  static M mask(uint32_t bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i b = _mm256_and_si256(_mm256_set1_epi32(int(bits)), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, sel));
  }
  static uint32_t bits_full(const uint8_t* row, int64_t c) { return row[c >> 3]; }
  static M mask_full(const uint8_t* row, int64_t c) { return mask(bits_full(row, c)); }
  static F mask_add(F acc, M m, F x) { return _mm256_add_ps(acc, _mm256_and_ps(m, x)); }
  static F pm(M m, F a) {
    const F neg = _mm256_xor_ps(a, _mm256_set1_ps(-0.0f));
    return _mm256_blendv_ps(neg, a, m);
  }
  static F blend(M m, F if0, F if1) { return _mm256_blendv_ps(if0, if1, m); }
  static uint32_t ge0(F v) {
    return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ)));
  }
};

}  // namespace qmerge::cpu::QMERGE_ISA
