#pragma once

#include <torch/types.h>

#include "kernels.h"

namespace qmerge::cpu {

// dst [out, in] = base + scale_task * signs_task (alpha 1), or the delta alone when base is
// undefined; dst has the dtype of the result and may alias base.
void dequant_one(const at::Tensor& base, const SignSet& signs, int64_t task, at::Tensor& dst);

// Rows [row0, row0 + rows) of base + task `task`'s delta, into dst [rows, in] (base's dtype).
void dequant_rows(const at::Tensor& base, const SignSet& signs, int64_t task, int64_t row0,
                  int64_t rows, at::Tensor& dst);

}  // namespace qmerge::cpu
