// Element-type tags shared by the SIMD layers and the kernels (no torch, no std).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qmerge::cpu {

struct TagF32 {
  using T = float;
};
struct TagF16 {
  using T = uint16_t;
};
struct TagBF16 {
  using T = uint16_t;
};

// std::is_same_v without <type_traits> (the ISA files include nothing after their pragma).
template <class A, class B>
inline constexpr bool same_v = false;
template <class A>
inline constexpr bool same_v<A, A> = true;

}  // namespace qmerge::cpu
