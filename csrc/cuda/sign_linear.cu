// sign_linear on CUDA (semantics: qmerge/ops/reference.py). The wrapper picks per call:
//   gemv  up to 8 rows per pass, one read of the base and of each used task's bits
//         (qm_sign_gemv): decoding (1-2 rows), fp32, and groups not 16-aligned;
//   mma   3 rows or more (fp16/bf16, sm_80+): the base as one cuBLAS GEMM over every row (fp32
//   out),
//         then the task terms on tensor cores with the signs expanded in registers
//         (qm_sign_mma), rows sorted by task on the device; no host sync.
#include <torch/library.h>

#include "launch.h"

namespace qmerge::cuda {
namespace {

constexpr const char* kOp = "sign_linear";
constexpr int64_t kGemvRows = 8;  // rows per qm_sign_gemv pass
// From this many rows (fp16/bf16) the mma path: a gemv pass computes every row's dot products on
// CUDA cores, which stops being memory-bound past 2 rows (bench/results/kernels-gpu-notes.md).
constexpr int64_t kMmaMinRows = 3;
constexpr int kGemvWarps = 8;  // warps (output rows in flight) per gemv block
constexpr int kMmaWarps = 4;   // 16-row output tiles per mma block

bool aligned16_ptr(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Tensor cores for mma.m16n8k16 (sm_80+); the capability is looked up once per device.
bool has_mma(const at::Tensor& x) {
  static int major[64] = {};  // 0: not looked up yet
  const int dev = x.device().index();
  if (dev < 0 || dev >= 64) return false;
  if (major[dev] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[dev], cudaDevAttrComputeCapabilityMajor, dev));
  }
  return major[dev] >= 8;
}

struct SignArgs {
  const uint8_t* packed;
  const float* scales;
  int scale_rows, groups, tasks;
  int64_t gs;
};

void launch_gemv(int nr, dim3 grid, const void* x, const void* w, const SignArgs& s,
                 const void* ids, int ids64, const float* coeffs, const float* bias, void* y,
                 int rows, int64_t out, int64_t in, int vec, Dt dt) {
#define QM_GEMV_CASE(NR, SUF, CT)                                                                \
  qm_sign_gemv##NR##_##SUF<<<grid, kGemvWarps * 32, 0, stream()>>>(                              \
      reinterpret_cast<const CT*>(x), reinterpret_cast<const CT*>(w), s.packed, s.scales,        \
      s.scale_rows, s.groups, s.gs, s.tasks, ids, ids64, coeffs, bias, reinterpret_cast<CT*>(y), \
      rows, out, in, vec)
#define QM_GEMV_NR(SUF, CT)                   \
  switch (nr) {                               \
    case 1: QM_GEMV_CASE(1, SUF, CT); break;  \
    case 2: QM_GEMV_CASE(2, SUF, CT); break;  \
    case 4: QM_GEMV_CASE(4, SUF, CT); break;  \
    default: QM_GEMV_CASE(8, SUF, CT); break; \
  }
  switch (dt) {
    case Dt::f32: QM_GEMV_NR(f32, float); break;
    case Dt::f16: QM_GEMV_NR(f16, qm_u16); break;
    case Dt::bf16: QM_GEMV_NR(bf16, qm_u16); break;
  }
#undef QM_GEMV_NR
#undef QM_GEMV_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_gemv(const at::Tensor& x, const at::Tensor& w, const SignArgs& s, const RoutesArg& r,
              const at::Tensor& bias32, at::Tensor& y) {
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0);
  const int vec = vec_ok(in, {&x, &w});
  const dim3 grid{unsigned(std::min<int64_t>(ceil_div(out, kGemvWarps), 1 << 20))};
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const int64_t esize = x.element_size();
  for (int64_t n0 = 0; n0 < rows; n0 += kGemvRows) {
    const int n = int(std::min(kGemvRows, rows - n0));
    const int nr = n == 1 ? 1 : n == 2 ? 2 : n <= 4 ? 4 : 8;
    const char* ids = static_cast<const char*>(r.ids_ptr());
    launch_gemv(nr, grid, static_cast<const char*>(x.data_ptr()) + n0 * in * esize,
                static_cast<const char*>(w.data_ptr()), s,
                ids ? ids + n0 * (r.ids64 ? 8 : 4) : nullptr, r.ids64,
                r.coeffs.defined() ? r.coeffs_ptr() + n0 * s.tasks : nullptr, bias,
                static_cast<char*>(y.data_ptr()) + n0 * out * esize, n, out, in,
                vec && (n0 * in * esize) % 16 == 0, dtype_of(x));
  }
}

void run_mma(const at::Tensor& x_in, const at::Tensor& w, const SignArgs& s, const RoutesArg& r,
             const at::Tensor& bias32, at::Tensor& y) {
  const int64_t rows = x_in.size(0), in = x_in.size(1), out = w.size(0);
  // The kernel reads x two values (4 bytes) at a time.
  const at::Tensor x = reinterpret_cast<std::uintptr_t>(x_in.data_ptr()) % 4 ? x_in.clone() : x_in;
  at::Tensor y32 = base_gemm_f32(x, w);
  const at::Tensor order = r.ids.defined() ? at::argsort(r.ids, /*stable=*/true).to(at::kInt)
                                           : at::arange(rows, x.options().dtype(at::kInt));
  const dim3 grid{unsigned(ceil_div(rows, 8)), unsigned(ceil_div(ceil_div(out, 16), kMmaWarps))};
  const auto* xp = static_cast<const qm_u16*>(x.data_ptr());
  const int* op = order.data_ptr<int>();
#define QM_MMA_ARGS                                                                        \
  xp, s.packed, s.scales, s.scale_rows, s.groups, s.gs, s.tasks, r.ids_ptr(), r.ids64, op, \
      r.coeffs_ptr(), y32.data_ptr<float>(), int(rows), out, in, int(aligned16_ptr(s.packed))
  if (dtype_of(x) == Dt::bf16) {
    qm_sign_mma_bf16<<<grid, kMmaWarps * 32, 0, stream()>>>(QM_MMA_ARGS);
  } else {
    qm_sign_mma_f16<<<grid, kMmaWarps * 32, 0, stream()>>>(QM_MMA_ARGS);
  }
#undef QM_MMA_ARGS
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const float* bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  const unsigned blocks = unsigned(ceil_div(rows * out, 256));
  auto* yp = static_cast<qm_u16*>(y.data_ptr());
  if (dtype_of(x) == Dt::bf16) {
    qm_finish_bf16<<<blocks, 256, 0, stream()>>>(y32.data_ptr<float>(), bias, yp, rows, out);
  } else {
    qm_finish_f16<<<blocks, 256, 0, stream()>>>(y32.data_ptr<float>(), bias, yp, rows, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sign_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& packed,
                       const at::Tensor& scales, const std::optional<at::Tensor>& task_ids,
                       const std::optional<at::Tensor>& coeffs,
                       const std::optional<at::Tensor>& bias) {
  check_linear(kOp, x, base_w);
  const int64_t rows = x.size(0), in = x.size(1), out = base_w.size(0);
  check_sign_set(kOp, packed, scales, out, in);
  check_routes(kOp, rows, packed.size(0), task_ids, coeffs);
  check_bias(kOp, bias, out);
  const at::Tensor no;
  check_device(kOp, x, "x",
               {{&base_w, "base_w"},
                {&packed, "packed"},
                {&scales, "scales"},
                {task_ids ? &*task_ids : &no, "task_ids"},
                {coeffs ? &*coeffs : &no, "coeffs"},
                {bias ? &*bias : &no, "bias"}});
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0 || out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor scales32 = scales.to(at::kFloat).contiguous();
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  SignArgs s;
  s.packed = packed.data_ptr<uint8_t>();
  s.scales = scales32.data_ptr<float>();
  s.scale_rows = int(scales.size(1));
  s.groups = int(scales.size(2));
  s.tasks = int(packed.size(0));
  s.gs = ceil_div(in, s.groups);
  const RoutesArg r = routes_arg(task_ids, coeffs);
  const bool mma = rows >= kMmaMinRows && x.scalar_type() != at::kFloat &&
                   (s.groups == 1 || s.gs % 16 == 0) && has_mma(x);
  if (mma) {
    run_mma(x, base_w, s, r, bias32, y);
  } else {
    run_gemv(x, base_w, s, r, bias32, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CUDA, m) { m.impl("sign_linear", &sign_linear); }

}  // namespace qmerge::cuda
