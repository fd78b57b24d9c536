#include "checks.h"

#include <ATen/Parallel.h>

namespace qmerge::cpu {

SignSet sign_set(const char* op, const at::Tensor& packed, const at::Tensor& scales, int64_t out,
                 int64_t in, at::Tensor& scales32) {
  check_sign_set(op, packed, scales, out, in);
  const int64_t nb = (in + 7) / 8, groups = scales.size(2);
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
