#pragma once

#include <torch/types.h>

#include "kernels.h"

namespace qmerge::cpu {

// dst [out, in] = base + scale_task * signs_task (alpha 1), or the delta alone when base is
// undefined; dst has the dtype of the result and may alias base.
void dequant_one(const at::Tensor& base, const SignSet& signs, int64_t task, at::Tensor& dst);

}  // namespace qmerge::cpu
