// sign_linear on the CPU (semantics: qmerge/ops/reference.py).
//
// The op picks its execution per call:
//   fused        one pass over the base weight and the task bits for up to 8 rows at a time
//                (kernels/gemv.h): decoding and small mixed batches; nothing is materialized;
//   materialized a task with many rows gets its weight rebuilt once (dequant_add_sign) and a
//                GEMM; mixtures too wide for the fused path use base GEMM + per-task delta GEMMs;
//   lut          one base product over every row, whatever its task, plus each task's sign term
//                for its rows by table lookup (sign_lut.h): mixed batches of several tasks.
// sign_path.h chooses by a cost model; QMERGE_SIGN_PATH=per_task|fused|materialized|lut forces
// one (per_task: fused below kMaterializeRows rows of a task, materialized from it).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "dequant_add_sign.h"
#include "isa.h"
#include "routing.h"
#include "sign_lut.h"
#include "sign_path.h"

namespace qmerge::cpu {
namespace {

constexpr const char* kOp = "sign_linear";
// Mixtures: the fused path while it needs at most this many passes over the weight.
constexpr size_t kMaxFusedMixtureChunks = 4;

at::Tensor linear_rows(const at::Tensor& x, const std::vector<int64_t>& rows, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias) {
  const at::Tensor idx = at::tensor(rows, at::kLong);
  const at::Tensor b = bias ? bias->to(x.scalar_type()) : at::Tensor();
  return at::linear(x.index_select(0, idx), w, b);
}

// Mixtures beyond the fused path: y = x W^T + sum_t c_t * (x D_t^T), D_t = dequantized delta.
at::Tensor mixture_materialized(const at::Tensor& x, const at::Tensor& base_w, const SignSet& s,
                                int64_t tasks, const Routes& r,
                                const std::optional<at::Tensor>& bias) {
  at::Tensor y32 = at::linear(x, base_w).to(at::kFloat);
  at::Tensor delta = at::empty_like(base_w);
  for (int64_t t = 0; t < tasks; ++t) {
    std::vector<int64_t> rows;
    std::vector<float> coeff;
    for (int64_t n = 0; n < r.rows(); ++n) {
      for (int64_t k = r.offset[n]; k < r.offset[n + 1]; ++k) {
        if (r.task[k] == t) {
          rows.push_back(n);
          coeff.push_back(r.coeff[k]);
        }
      }
    }
    if (rows.empty()) continue;
    dequant_one(at::Tensor(), s, t, delta);
    const at::Tensor part = linear_rows(x, rows, delta, std::nullopt).to(at::kFloat);
    y32.index_add_(0, at::tensor(rows, at::kLong), part * at::tensor(coeff).unsqueeze(1));
  }
  if (bias) y32.add_(bias->to(at::kFloat));
  return y32.to(x.scalar_type());
}

// Rows [begin, end) that use one weight: slot 0 the base, slot t + 1 the base plus task t.
struct Segment {
  int64_t slot, begin, end;
};

// The rows of one slot as runs of consecutive rows (a sequence's tokens are consecutive), so
// each run is a view of x and of y: no row is gathered or scattered.
void add_runs(int64_t slot, const std::vector<int64_t>& group, std::vector<Segment>& out) {
  size_t i = 0;
  while (i < group.size()) {
    size_t j = i + 1;
    while (j < group.size() && group[j] == group[j - 1] + 1) ++j;
    out.push_back({slot, group[i], group[j - 1] + 1});
    i = j;
  }
}

// The buffer a task's weight is rebuilt into, kept per thread: a fresh buffer per call can be
// served by glibc with fresh pages, faulted in on every call (page faults are not cheap on
// this project's VM: bench/results/routing-notes.md). It holds one weight of the largest
// layer seen.
at::Tensor scratch_for(const at::Tensor& like) {
  thread_local at::Tensor buffer;
  const int64_t need = like.numel() * like.element_size();
  if (!buffer.defined() || buffer.nbytes() < size_t(need)) {
    buffer = at::empty({std::max<int64_t>(need, 1)}, like.options().dtype(at::kByte));
  }
  return at::from_blob(buffer.data_ptr(), like.sizes(), like.options());
}

// ys = xs W_slot^T + bias for a task's rows, the task's weight rebuilt in blocks of output rows,
// one block per thread: each thread rebuilds its rows and runs the (single-threaded) GEMM that
// reads them. Rebuilding on all threads and then running one multi-threaded GEMM made other
// cores read the freshly written rows, and on the 2-core VM that ran 1.9x slower than this in
// stretches of minutes (bench/results/routing-notes.md).
void rebuild_and_gemm(const at::Tensor& xs, const at::Tensor& base_w, const SignSet& s,
                      int64_t task, const at::Tensor& b, at::Tensor& ys) {
  const int64_t out = base_w.size(0);
  const at::Tensor w = scratch_for(base_w);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (out + threads - 1) / threads);
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    at::AutoDispatchBelowAutograd below_autograd;  // workers do not inherit the grad mode
    at::Tensor rows = w.narrow(0, o0, o1 - o0);
    dequant_rows(base_w, s, task, o0, o1 - o0, rows);
    at::Tensor dst = ys.narrow(1, o0, o1 - o0);
    if (b.defined()) {
      at::addmm_out(dst, b.narrow(0, o0, o1 - o0), xs, rows.t());
    } else {
      at::mm_out(dst, xs, rows.t());
    }
  });
}

// y[rows] = x[rows] W_slot^T + bias for each slot's segments. A slot with one run of rows uses
// views of x and y; with several runs its rows are gathered into one block, which is faster
// on few cores than a GEMM per run (GEMMs of a few dozen rows lose a fifth of their speed:
// bench/results/routing-notes.md).
void run_segments(const at::Tensor& x, const at::Tensor& base_w, const SignSet& s,
                  const std::vector<Segment>& segments, const std::optional<at::Tensor>& bias,
                  at::Tensor& y) {
  const at::Tensor b = bias ? bias->to(x.scalar_type()) : at::Tensor();
  size_t k = 0;
  while (k < segments.size()) {
    size_t end = k;
    while (end < segments.size() && segments[end].slot == segments[k].slot) ++end;
    const int64_t slot = segments[k].slot;
    at::Tensor idx, xs, ys;
    if (end - k == 1) {
      xs = x.narrow(0, segments[k].begin, segments[k].end - segments[k].begin);
      ys = y.narrow(0, segments[k].begin, segments[k].end - segments[k].begin);
    } else {
      std::vector<int64_t> rows;
      for (size_t i = k; i < end; ++i) {
        for (int64_t n = segments[i].begin; n < segments[i].end; ++n) rows.push_back(n);
      }
      idx = at::tensor(rows, at::kLong);
      xs = x.index_select(0, idx);
      ys = at::empty({xs.size(0), y.size(1)}, y.options());
    }
    if (slot == 0) {
      if (b.defined()) {
        at::addmm_out(ys, b, xs, base_w.t());
      } else {
        at::mm_out(ys, xs, base_w.t());
      }
    } else {
      rebuild_and_gemm(xs, base_w, s, slot - 1, b, ys);
    }
    if (idx.defined()) y.index_copy_(0, idx, ys);
    k = end;
  }
}

at::Tensor sign_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& packed,
                       const at::Tensor& scales, const std::optional<at::Tensor>& task_ids,
                       const std::optional<at::Tensor>& coeffs,
                       const std::optional<at::Tensor>& bias) {
  check_linear(kOp, x, base_w);
  const int64_t rows = x.size(0), in = x.size(1), out = base_w.size(0);
  at::Tensor scales32;
  const SignSet s = sign_set(kOp, packed, scales, out, in, scales32);
  const Routes r = parse_routes(kOp, rows, packed.size(0), task_ids, coeffs);
  check_bias(kOp, bias, out);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;

  const SignPath path = choose_sign_path(x, s, r);
  if (path == SignPath::lut) return lut_linear(x, base_w, packed, s, r, bias);
  const int64_t materialize_rows = path == SignPath::materialized ? 1
                                   : path == SignPath::fused      ? rows + 1
                                                                  : kMaterializeRows;
  // (SignPath::per_task: fused below kMaterializeRows rows of a task, materialized from it.)
  std::vector<int64_t> fused;
  if (r.max_terms <= 1) {
    // Group rows by task (slot 0 = no task) and materialize the tasks with many rows.
    std::vector<std::vector<int64_t>> by_task(packed.size(0) + 1);
    for (int64_t n = 0; n < rows; ++n) {
      by_task[r.terms(n) ? r.task[r.offset[n]] + 1 : 0].push_back(n);
    }
    std::vector<Segment> segments;
    for (int64_t slot = 0; slot < int64_t(by_task.size()); ++slot) {
      const auto& group = by_task[slot];
      if (int64_t(group.size()) < materialize_rows) {
        fused.insert(fused.end(), group.begin(), group.end());
        continue;
      }
      add_runs(slot, group, segments);
    }
    run_segments(x, base_w, s, segments, bias, y);
    std::sort(fused.begin(), fused.end());
  } else {
    for (int64_t n = 0; n < rows; ++n) fused.push_back(n);
    // Forced `fused` still materializes rows of more than kMaxChunk terms.
    if (r.max_terms > kMaxChunk || path == SignPath::materialized ||
        (path != SignPath::fused && make_chunks(r, fused).size() > kMaxFusedMixtureChunks)) {
      return mixture_materialized(x, base_w, s, packed.size(0), r, bias);
    }
  }
  if (fused.empty()) return y;

  const bool all = int64_t(fused.size()) == rows;
  const at::Tensor idx = all ? at::Tensor() : at::tensor(fused, at::kLong);
  const at::Tensor x32 = padded_rows_f32(all ? x : x.index_select(0, idx));
  at::Tensor y32 = at::zeros({x32.size(0), out}, x.options().dtype(at::kFloat));
  run_gemv(base_w, in, out, in, x32, /*x_exact=*/true, make_chunks(r, fused), &s, y32);
  if (bias) y32.add_(bias->to(at::kFloat));
  if (all) return y32.to(x.scalar_type());
  y.index_copy_(0, idx, y32.to(x.scalar_type()));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(qmerge, CPU, m) { m.impl("sign_linear", &sign_linear); }

}  // namespace qmerge::cpu
