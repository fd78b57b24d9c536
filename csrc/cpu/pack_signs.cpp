// pack_signs / unpack_signs on the CPU (semantics: qmerge/ops/reference.py).
#include <torch/library.h>

#include "checks.h"
#include "isa.h"

namespace qmerge::cpu {
namespace {

at::Tensor pack_signs(const at::Tensor& delta) {
  constexpr const char* op = "pack_signs";
  PackArgs a;
  a.dtype = float_dtype(delta, op, "delta");
  TORCH_CHECK_VALUE(delta.dim() >= 1, "qmerge.", op, ": 'delta' must have at least 1 dimension");
  check_contiguous(delta, op, "delta");
  a.in = delta.size(-1);
  a.nb = (a.in + 7) / 8;
  auto shape = delta.sizes().vec();
  shape.back() = a.nb;
  at::Tensor packed = at::zeros(shape, delta.options().dtype(at::kByte));
  const int64_t rows = a.in ? delta.numel() / a.in : 0;
  a.src = delta.data_ptr();
  a.dst = packed.data_ptr<uint8_t>();
  const KernelTable& k = kernels();
  parallel_rows(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(a.in, 1)),
                [&](int64_t r0, int64_t r1) { k.pack(a, r0, r1); });
  return packed;
}

at::Tensor unpack_signs(const at::Tensor& packed, int64_t in_features,
                        std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "unpack_signs";
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "qmerge.", op,
                   ": 'packed' must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1, "qmerge.", op, ": 'packed' must have at least 1 dimension");
  check_contiguous(packed, op, "packed");
  TORCH_CHECK_VALUE(in_features >= 0, "qmerge.", op, ": 'in_features' must be >= 0, got ",
                    in_features);
  const int64_t nb = (in_features + 7) / 8;
  TORCH_CHECK_VALUE(packed.size(-1) == nb, "qmerge.", op, ": 'packed' last dim must be ", nb,
                    " (ceil(in_features / 8) for in_features = ", in_features, "), got ",
                    packed.size(-1));
  auto shape = packed.sizes().vec();
  shape.back() = in_features;
  at::Tensor out = at::empty(shape, packed.options().dtype(dtype.value_or(at::kFloat)));
  UnpackArgs a;
  a.dtype = float_dtype(out, op, "dtype");
  a.in = in_features;
  a.nb = nb;
  a.src = packed.data_ptr<uint8_t>();
  a.dst = out.data_ptr();
  const int64_t rows = nb ? packed.numel() / nb : 0;
  const KernelTable& k = kernels();
  parallel_rows(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(in_features, 1)),
                [&](int64_t r0, int64_t r1) { k.unpack(a, r0, r1); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CPU, m) {
  m.impl("pack_signs", &pack_signs);
  m.impl("unpack_signs", &unpack_signs);
}

}  // namespace qmerge::cpu
