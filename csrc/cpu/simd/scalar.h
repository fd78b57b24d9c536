// Portable one-lane "vector": the reference-speed path for CPUs without AVX2, and the oracle the
// vector paths are tested against. Conversions are c10's own, so rounding matches torch exactly.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels/tags.h"

namespace qmerge::cpu::QMERGE_ISA {

struct Simd {
  static constexpr int W = 1;
  using F = float;
  using M = bool;

  static F zero() { return 0.0f; }
  static F set1(float a) { return a; }
  static F add(F a, F b) { return a + b; }
  static F fma(F a, F b, F c) { return a * b + c; }
  static float hsum(F a) { return a; }

  static F load(TagF32, const float* p) { return *p; }
  static F load(TagF16, const uint16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(*p); }
  static F load(TagBF16, const uint16_t* p) { return c10::detail::f32_from_bits(*p); }
  template <class Tag>
  static F load(Tag tag, const typename Tag::T* p, int n) {
    return n > 0 ? load(tag, p) : 0.0f;
  }

  static void store(TagF32, float* p, F v) { *p = v; }
  static void store(TagF16, uint16_t* p, F v) { *p = c10::detail::fp16_ieee_from_fp32_value(v); }
  static void store(TagBF16, uint16_t* p, F v) { *p = c10::detail::round_to_nearest_even(v); }
  template <class Tag>
  static void store(Tag tag, typename Tag::T* p, F v, int n) {
    if (n > 0) store(tag, p, v);
  }
  // No non-temporal stores for one lane: plain stores.
  template <class Tag>
  static void stream(Tag tag, typename Tag::T* p, F v) {
    store(tag, p, v);
  }
  static void fence() {}

  static M mask(uint32_t bits) { return (bits & 1u) != 0; }
  static uint32_t bits_full(const uint8_t* row, int64_t c) { return row[c >> 3] >> (c & 7); }
  static M mask_full(const uint8_t* row, int64_t c) { return mask(bits_full(row, c)); }
  static F mask_add(F acc, M m, F x) { return m ? acc + x : acc; }
  static F pm(M m, F a) { return m ? a : -a; }
  static F blend(M m, F if0, F if1) { return m ? if1 : if0; }
  static uint32_t ge0(F v) { return v >= 0.0f ? 1u : 0u; }
};

}  // namespace qmerge::cpu::QMERGE_ISA
