// dequant_add_sign and its out variant on CUDA (semantics: qmerge/ops/reference.py; kernel:
// qm_dequant in kernels.cuh).
#include <torch/library.h>

#include "launch.h"

namespace qmerge::cuda {
namespace {

constexpr const char* kOp = "dequant_add_sign";
constexpr int64_t kThreads = 128;  // a block covers kThreads * kDequantChunks bytes of a row

void dequant_into(const at::Tensor& base, const at::Tensor& packed, const at::Tensor& scales,
                  const at::Tensor& alphas, at::Tensor& out) {
  check_float(base, kOp, "base");
  check_dim(base, 2, kOp, "base");
  check_contiguous(base, kOp, "base");
  const int64_t rows = base.size(0), in = base.size(1);
  check_sign_set(kOp, packed, scales, rows, in);
  const int64_t tasks = packed.size(0);
  check_alphas(kOp, alphas, tasks);
  check_out(kOp, out, base);
  check_device(kOp, base, "base",
               {{&packed, "packed"}, {&scales, "scales"}, {&alphas, "alphas"}, {&out, "out"}});
  if (rows == 0 || in == 0) return;
  const c10::cuda::CUDAGuard guard(base.device());
  // alpha_t * scale_t in fp32, exactly the reference's product.
  const at::Tensor ascales =
      (scales.to(at::kFloat) * alphas.to(at::kFloat).view({tasks, 1, 1})).contiguous();
  const int64_t groups = scales.size(2), gs = ceil_div(in, groups);
  const int64_t nb = ceil_div(in, 8);
  const dim3 grid{unsigned(ceil_div(nb, kThreads * kDequantChunks)),
                  unsigned(std::min<int64_t>(rows, 65535))};
  const int vec = vec_ok(in, {&base, &out});
  const int srows = int(scales.size(1));
  const auto* bits = packed.data_ptr<uint8_t>();
  const float* as = ascales.data_ptr<float>();
  switch (dtype_of(base)) {
    case Dt::f32:
      qm_dequant_f32<<<grid, kThreads, 0, stream()>>>(base.data_ptr<float>(), bits, as, srows,
                                                      int(groups), gs, int(tasks),
                                                      out.data_ptr<float>(), rows, in, vec);
      break;
    case Dt::f16:
      qm_dequant_f16<<<grid, kThreads, 0, stream()>>>(
          static_cast<const qm_u16*>(base.data_ptr()), bits, as, srows, int(groups), gs, int(tasks),
          static_cast<qm_u16*>(out.data_ptr()), rows, in, vec);
      break;
    case Dt::bf16:
      qm_dequant_bf16<<<grid, kThreads, 0, stream()>>>(
          static_cast<const qm_u16*>(base.data_ptr()), bits, as, srows, int(groups), gs, int(tasks),
          static_cast<qm_u16*>(out.data_ptr()), rows, in, vec);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dequant_add_sign(const at::Tensor& base, const at::Tensor& packed,
                            const at::Tensor& scales, const at::Tensor& alphas) {
  check_float(base, kOp, "base");
  at::Tensor out = at::empty_like(base, at::MemoryFormat::Contiguous);
  dequant_into(base, packed, scales, alphas, out);
  return out;
}

void dequant_add_sign_out(const at::Tensor& base, const at::Tensor& packed,
                          const at::Tensor& scales, const at::Tensor& alphas, at::Tensor& out) {
  dequant_into(base, packed, scales, alphas, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CUDA, m) {
  m.impl("dequant_add_sign", &dequant_add_sign);
  m.impl("dequant_add_sign_out", &dequant_add_sign_out);
}

}  // namespace qmerge::cuda
