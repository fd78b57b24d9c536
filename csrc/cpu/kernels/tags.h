// Element-type tags shared by the SIMD layers and the kernels (no torch, no std).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace qmerge::cpu {

struct TagF32 { using T = float; };
struct TagF16 { using T = uint16_t; };
struct TagBF16 { using T = uint16_t; };

}  // namespace qmerge::cpu
