// dequant_add_sign and its out variant on the CPU (semantics: qmerge/ops/reference.py).
#include <torch/library.h>

#include "dequant_add_sign.h"

#include "checks.h"
#include "isa.h"

namespace qmerge::cpu {
namespace {

constexpr const char* kOp = "dequant_add_sign";

// Outputs at least this large are written with non-temporal stores, which skip the
// read-for-ownership of every destination line (a third of the traffic). 8 MiB is about a
// socket's last-level cache share of a few cores: with the base and the bits streaming through
// too, a larger output would not stay cached for its next reader anyway. A constant, not
// sysconf(_SC_LEVEL3_CACHE_SIZE): virtual machines report the host's cache (320 MiB here).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

void run_dequant(DequantArgs a, int64_t rows) {
  a.stream = rows * a.in * int64_t(a.dtype == DType::f32 ? 4 : 2) >= kStreamBytes;
  const KernelTable& k = kernels();
  parallel_rows(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(a.in, 1)),
                [&](int64_t i0, int64_t i1) { k.dequant(a, i0, i1); });
}

void dequant_into(const at::Tensor& base, const at::Tensor& packed, const at::Tensor& scales,
                  const at::Tensor& alphas, at::Tensor& out) {
  DequantArgs a;
  a.dtype = float_dtype(base, kOp, "base");
  check_dim(base, 2, kOp, "base");
  check_contiguous(base, kOp, "base");
  const int64_t rows = base.size(0), in = base.size(1);
  at::Tensor scales32;
  a.signs = sign_set(kOp, packed, scales, rows, in, scales32);
  a.tasks = packed.size(0);
  check_alphas(kOp, alphas, a.tasks);
  check_out(kOp, out, base);
  // alpha_t * scale_t in fp32, exactly the reference's product.
  const at::Tensor ascales = (scales32 * alphas.to(at::kFloat).view({a.tasks, 1, 1})).contiguous();
  a.signs.scales = ascales.data_ptr<float>();
  a.base = base.data_ptr();
  a.dst = out.data_ptr();
  a.in = in;
  run_dequant(a, rows);
}

at::Tensor dequant_add_sign(const at::Tensor& base, const at::Tensor& packed,
                            const at::Tensor& scales, const at::Tensor& alphas) {
  float_dtype(base, kOp, "base");
  at::Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  dequant_into(base, packed, scales, alphas, out);
  return out;
}

void dequant_add_sign_out(const at::Tensor& base, const at::Tensor& packed,
                          const at::Tensor& scales, const at::Tensor& alphas, at::Tensor& out) {
  dequant_into(base, packed, scales, alphas, out);
}

}  // namespace

void dequant_one(const at::Tensor& base, const SignSet& signs, int64_t task, at::Tensor& dst) {
  DequantArgs a;
  a.dtype = float_dtype(dst, kOp, "dst");
  a.base = base.defined() ? base.data_ptr() : nullptr;
  a.dst = dst.data_ptr();
  a.in = dst.size(1);
  a.tasks = 1;
  a.signs = signs;
  a.signs.packed = signs.bits_row(task, 0);
  a.signs.scales = signs.scale_row(task, 0);
  run_dequant(a, dst.size(0));
}

void dequant_rows(const at::Tensor& base, const SignSet& signs, int64_t task, int64_t row0,
                  int64_t rows, at::Tensor& dst) {
  DequantArgs a;
  a.dtype = float_dtype(dst, kOp, "dst");
  a.in = base.size(1);
  a.base = static_cast<const char*>(base.data_ptr()) + row0 * a.in * base.element_size();
  a.dst = dst.data_ptr();
  a.tasks = 1;
  a.signs = signs;
  a.signs.packed = signs.bits_row(task, row0);
  a.signs.scales = signs.scale_row(task, row0);
  run_dequant(a, rows);
}

TORCH_LIBRARY_IMPL(qmerge, CPU, m) {
  m.impl("dequant_add_sign", &dequant_add_sign);
  m.impl("dequant_add_sign_out", &dequant_add_sign_out);
}

}  // namespace qmerge::cpu
