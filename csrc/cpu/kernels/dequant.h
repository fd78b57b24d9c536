// dequant_add_sign over a range of output rows:
//   dst[i, c] = base[i, c] + sum_t ascale[t, i, g(c)] * (bit ? +1 : -1), fp32, tasks in order.
// The order of additions is the reference's (qmerge/ops/reference.py), so results are bitwise
// equal to it.
//
// This is a streaming kernel: with two cores, how far ahead the loads run (and so the bandwidth
// reached) depends on how few instructions each block costs. Hence the per-task +scale / -scale
// vectors made once per span, the task count as a template argument for the common 1..4, and
// non-temporal stores for large outputs (DequantArgs::stream).
#pragma once

#include "kernels/bits.h"

namespace qmerge::cpu::QMERGE_ISA {

// One scale group [c0, c1) of row i. NT = the task count when known at compile time (1..4),
// 0 = a.tasks at run time.
template <class Tag, bool HAS_BASE, bool ALIGNED, bool STREAM, int NT>
QM_INLINE void dequant_span(const DequantArgs& a, int64_t i, int64_t g, int64_t c0, int64_t c1) {
  using T = typename Tag::T;
  using F = typename Simd::F;
  constexpr int W = Simd::W;
  constexpr int kSplat = NT > 0 ? NT : 1;
  const SignSet& s = a.signs;
  const int64_t tasks = NT > 0 ? NT : a.tasks, nb = s.nb;
  const T* base = static_cast<const T*>(a.base) + i * a.in;
  T* dst = static_cast<T*>(a.dst) + i * a.in;
  const uint8_t* bits0 = s.bits_row(0, i);
  const float* scale0 = s.scale_row(0, i) + g;
  const int64_t bits_step = s.out * nb, scale_step = s.scale_rows * s.groups;
  F pos[kSplat], neg[kSplat];
  if (NT > 0) {
    for (int t = 0; t < kSplat; ++t) {
      pos[t] = Simd::set1(scale0[t * scale_step]);
      neg[t] = Simd::set1(-scale0[t * scale_step]);
    }
  }
  // +-scale of task t for the sign bits b (one per lane), added to v.
  auto add_task = [&](F v, int64_t t, uint32_t b) {
    if (NT > 0) return Simd::add(v, Simd::blend(Simd::mask(b), neg[t], pos[t]));
    return Simd::add(v, Simd::pm(Simd::mask(b), Simd::set1(scale0[t * scale_step])));
  };
  int64_t c = c0;
  for (; c + W <= c1; c += W) {
    F v = HAS_BASE ? Simd::load(Tag{}, base + c) : Simd::zero();
    for (int64_t t = 0; t < tasks; ++t) {
      const uint8_t* row = bits0 + t * bits_step;
      v = add_task(v, t, ALIGNED ? Simd::bits_full(row, c) : bits32_any(row, c, nb));
    }
    if (STREAM) {
      Simd::stream(Tag{}, dst + c, v);
    } else {
      Simd::store(Tag{}, dst + c, v);
    }
  }
  if (c < c1) {
    const int n = int(c1 - c);
    F v = HAS_BASE ? Simd::load(Tag{}, base + c, n) : Simd::zero();
    for (int64_t t = 0; t < tasks; ++t)
      v = add_task(v, t, bits32_any(bits0 + t * bits_step, c, nb));
    Simd::store(Tag{}, dst + c, v, n);
  }
}

template <class Tag, bool HAS_BASE, int NT>
void dequant_rows_nt(const DequantArgs& a, int64_t i0, int64_t i1) {
  using T = typename Tag::T;
  constexpr uintptr_t kVecBytes = Simd::W * sizeof(T);
  const SignSet& s = a.signs;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t c0 = g * s.group_size;
      if (c0 >= a.in) break;
      const int64_t c1 = min64(a.in, c0 + s.group_size);
      // Streaming stores need every full block of the span aligned to a vector.
      const T* first = static_cast<const T*>(a.dst) + i * a.in + c0;
      const bool stream = a.stream && (reinterpret_cast<uintptr_t>(first) % kVecBytes) == 0;
      if ((c0 & 7) != 0) {
        dequant_span<Tag, HAS_BASE, false, false, NT>(a, i, g, c0, c1);
      } else if (stream) {
        dequant_span<Tag, HAS_BASE, true, true, NT>(a, i, g, c0, c1);
      } else {
        dequant_span<Tag, HAS_BASE, true, false, NT>(a, i, g, c0, c1);
      }
    }
  }
  if (a.stream) Simd::fence();
}

template <class Tag, bool HAS_BASE>
void dequant_rows_b(const DequantArgs& a, int64_t i0, int64_t i1) {
  switch (a.tasks) {
    case 1: return dequant_rows_nt<Tag, HAS_BASE, 1>(a, i0, i1);
    case 2: return dequant_rows_nt<Tag, HAS_BASE, 2>(a, i0, i1);
    case 3: return dequant_rows_nt<Tag, HAS_BASE, 3>(a, i0, i1);
    case 4: return dequant_rows_nt<Tag, HAS_BASE, 4>(a, i0, i1);
    default: return dequant_rows_nt<Tag, HAS_BASE, 0>(a, i0, i1);
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
