// pack_signs / unpack_signs over a range of rows.
#pragma once

#include "kernels/bits.h"

namespace qmerge::cpu::QMERGE_ISA {

template <class Tag>
void pack_rows(const PackArgs& a, int64_t r0, int64_t r1) {
  using T = typename Tag::T;
  constexpr int W = Simd::W;
  for (int64_t r = r0; r < r1; ++r) {
    const T* src = static_cast<const T*>(a.src) + r * a.in;
    uint8_t* dst = a.dst + r * a.nb;
    for (int64_t c = 0; c < a.in; c += W) {
      const int n = int(min64(W, a.in - c));
      const auto v = n == W ? Simd::load(Tag{}, src + c) : Simd::load(Tag{}, src + c, n);
      const uint32_t m = Simd::ge0(v) & low_bits(n);  // padding bits stay 0
      if constexpr (W >= 8) {
        for (int k = 0; 8 * k < n; ++k) dst[(c >> 3) + k] = uint8_t(m >> (8 * k));
      } else {
        dst[c >> 3] |= uint8_t(m << (c & 7));  // dst is zeroed by the caller
      }
    }
  }
}

template <class Tag>
void unpack_rows(const UnpackArgs& a, int64_t r0, int64_t r1) {
  using T = typename Tag::T;
  constexpr int W = Simd::W;
  const auto one = Simd::set1(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = a.src + r * a.nb;
    T* dst = static_cast<T*>(a.dst) + r * a.in;
    int64_t c = 0;
    for (; c + W <= a.in; c += W) {
      Simd::store(Tag{}, dst + c, Simd::pm(Simd::mask(Simd::bits_full(src, c)), one));
    }
    if (c < a.in) {
      const int n = int(a.in - c);
      Simd::store(Tag{}, dst + c, Simd::pm(Simd::mask(bits32_any(src, c, a.nb)), one), n);
    }
  }
}

}  // namespace qmerge::cpu::QMERGE_ISA
