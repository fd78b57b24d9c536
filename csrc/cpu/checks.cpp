#include "checks.h"

#include <ATen/Parallel.h>

namespace qmerge::cpu {

SignSet sign_set(const char* op, const at::Tensor& packed, const at::Tensor& scales, int64_t out,
                 int64_t in, at::Tensor& scales32) {
  const int64_t nb = (in + 7) / 8;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "qmerge.", op,
                   ": 'packed' must be uint8, got ", packed.scalar_type());
  check_dim(packed, 3, op, "packed");
  check_contiguous(packed, op, "packed");
  const int64_t tasks = packed.size(0);
  TORCH_CHECK_VALUE(packed.size(1) == out && packed.size(2) == nb, "qmerge.", op,
                    ": 'packed' must have shape [T, ", out, ", ", nb,
                    "] (out_features, ceil(in_features / 8)), got ", packed.sizes());
  float_dtype(scales, op, "scales");
  check_dim(scales, 3, op, "scales");
  check_contiguous(scales, op, "scales");
  TORCH_CHECK_VALUE(scales.size(0) == tasks, "qmerge.", op, ": 'scales' must have ", tasks,
                    " tasks (dim 0 of 'packed'), got shape ", scales.sizes());
  TORCH_CHECK_VALUE(scales.size(1) == 1 || scales.size(1) == out, "qmerge.", op,
                    ": 'scales' dim 1 must be 1 (per tensor) or ", out,
                    " (per row), got shape ", scales.sizes());
  const int64_t groups = scales.size(2);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= std::max<int64_t>(in, 1), "qmerge.", op,
                    ": 'scales' dim 2 (groups along in_features) must be in [1, ", in,
                    "], got shape ", scales.sizes());
  scales32 = scales.to(at::kFloat).contiguous();

  SignSet s;
  s.packed = packed.data_ptr<uint8_t>();
  s.nb = nb;
  s.scales = scales32.data_ptr<float>();
  s.scale_rows = scales.size(1);
  s.groups = groups;
  s.group_size = (in + groups - 1) / groups;
  s.out = out;
  return s;
}

}  // namespace qmerge::cpu
