// dequant_add_sign over a range of output rows:
//   dst[i, c] = base[i, c] + sum_t ascale[t, i, g(c)] * (bit ? +1 : -1), fp32, tasks in order.
// The order of additions is the reference's (qmerge/ops/reference.py), so results are bitwise
// equal to it.
#pragma once

#include "kernels/bits.h"

namespace qmerge::cpu::QMERGE_ISA {

template <class Tag, bool HAS_BASE, bool ALIGNED>
QM_INLINE void dequant_span(const DequantArgs& a, int64_t i, int64_t g, int64_t c0, int64_t c1) {
  using T = typename Tag::T;
  constexpr int W = Simd::W;
  const SignSet& s = a.signs;
  const T* base = static_cast<const T*>(a.base) + i * a.in;
  T* dst = static_cast<T*>(a.dst) + i * a.in;
  const uint8_t* bits0 = s.bits_row(0, i);
  const float* scale0 = s.scale_row(0, i) + g;
  const int64_t bits_step = s.out * s.nb, scale_step = s.scale_rows * s.groups;
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    auto v = HAS_BASE ? Simd::load(Tag{}, base + c) : Simd::zero();
    for (int64_t t = 0; t < a.tasks; ++t) {
      const uint8_t* row = bits0 + t * bits_step;
      const uint32_t b = ALIGNED ? Simd::bits_full(row, c) : bits_any(row, c, s.nb);
      v = Simd::add(v, Simd::pm(Simd::mask(b), Simd::set1(scale0[t * scale_step])));
    }
    Simd::store(Tag{}, dst + c, v);
  }
  if (c < c1) {
    const int n = int(c1 - c);
    auto v = HAS_BASE ? Simd::load(Tag{}, base + c, n) : Simd::zero();
    for (int64_t t = 0; t < a.tasks; ++t) {
      const uint32_t b = bits_any(bits0 + t * bits_step, c, s.nb);
      v = Simd::add(v, Simd::pm(Simd::mask(b), Simd::set1(scale0[t * scale_step])));
    }
    Simd::store(Tag{}, dst + c, v, n);
  }
}

template <class Tag, bool HAS_BASE>
void dequant_rows_b(const DequantArgs& a, int64_t i0, int64_t i1) {
  const SignSet& s = a.signs;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t c0 = g * s.group_size;
      if (c0 >= a.in) break;
      const int64_t c1 = min64(a.in, c0 + s.group_size);
      if ((c0 & 7) == 0) {
        dequant_span<Tag, HAS_BASE, true>(a, i, g, c0, c1);
      } else {
        dequant_span<Tag, HAS_BASE, false>(a, i, g, c0, c1);
      }
    }
  }
}

template <class Tag>
void dequant_rows(const DequantArgs& a, int64_t i0, int64_t i1) {
  if (a.base) {
    dequant_rows_b<Tag, true>(a, i0, i1);
  } else {
    dequant_rows_b<Tag, false>(a, i0, i1);
  }
}

}  // namespace qmerge::cpu::QMERGE_ISA
