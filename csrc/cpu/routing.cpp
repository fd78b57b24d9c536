#include "routing.h"

#include "checks.h"
#include "isa.h"

namespace qmerge::cpu {

Routes parse_routes(const char* op, int64_t rows, int64_t tasks,
                    const std::optional<at::Tensor>& task_ids,
                    const std::optional<at::Tensor>& coeffs) {
  check_routes(op, rows, tasks, task_ids, coeffs);
  Routes r;
  r.offset.reserve(rows + 1);
  r.offset.push_back(0);
  if (task_ids) {
    const at::Tensor& ids = *task_ids;
    const at::Tensor ids64 = ids.to(at::kLong);
    const int64_t* p = ids64.data_ptr<int64_t>();
    for (int64_t n = 0; n < rows; ++n) {
      TORCH_CHECK_INDEX(p[n] >= -1 && p[n] < tasks, "qmerge.", op, ": 'task_ids'[", n, "] = ", p[n],
                        " is out of range: expected -1 (no task) or 0..", tasks - 1);
      if (p[n] >= 0) {
        r.task.push_back(int32_t(p[n]));
        r.coeff.push_back(1.0f);
      }
      r.offset.push_back(int64_t(r.task.size()));
    }
  } else {
    const at::Tensor& c = *coeffs;
    const at::Tensor c32 = c.to(at::kFloat).contiguous();
    const float* p = c32.data_ptr<float>();
    for (int64_t n = 0; n < rows; ++n) {
      for (int64_t t = 0; t < tasks; ++t) {
        const float v = p[n * tasks + t];
        if (v != 0.0f) {
          r.task.push_back(int32_t(t));
          r.coeff.push_back(v);
        }
      }
      r.offset.push_back(int64_t(r.task.size()));
    }
  }
  for (int64_t n = 0; n < rows; ++n) r.max_terms = std::max(r.max_terms, r.terms(n));
  return r;
}

std::vector<Chunk> make_chunks(const Routes& routes, const std::vector<int64_t>& rows) {
  const KernelTable& k = kernels();
  std::vector<Chunk> out;
  Chunk run;
  auto flush = [&] {
    bool any = false;
    for (int j = 0; j < run.nr; ++j) any = any || run.task[j] >= 0;
    for (int j0 = 0; j0 < run.nr; j0 += any ? k.routed_rows : run.nr) {
      Chunk c;
      c.row = run.row + j0;
      c.nr = any ? std::min(k.routed_rows, run.nr - j0) : run.nr;
      bool has = false;
      for (int j = 0; j < c.nr; ++j) {
        c.task[j] = run.task[j0 + j];
        c.coeff[j] = run.coeff[j0 + j];
        has = has || c.task[j] >= 0;
      }
      c.np = has ? c.nr : 0;
      out.push_back(c);
    }
    run = Chunk{};
  };
  for (int64_t m = 0; m < int64_t(rows.size()); ++m) {
    const int64_t n = rows[m];
    const int64_t k0 = routes.offset[n], nt = routes.terms(n);
    TORCH_INTERNAL_ASSERT(nt <= kMaxChunk, "row with ", nt, " terms reached the fused path");
    if (nt >= 2) {
      flush();
      Chunk c;
      c.nr = 1;
      c.np = int32_t(nt);
      c.row = m;
      for (int64_t j = 0; j < nt; ++j) {
        c.task[j] = routes.task[k0 + j];
        c.coeff[j] = routes.coeff[k0 + j];
      }
      out.push_back(c);
      continue;
    }
    if (run.nr == 0) run.row = m;
    run.task[run.nr] = nt ? routes.task[k0] : -1;
    run.coeff[run.nr] = nt ? routes.coeff[k0] : 0.0f;
    if (++run.nr == k.plain_rows) flush();
  }
  flush();
  return out;
}

namespace {

// x rows converted to `dtype`, `per_line` elements to a 64-byte line. Rows a power-of-two bytes
// apart (16 KiB at in = 4096, fp32) all map to one L1 set; a line of padding per row spreads
// them. Measured: no visible gain on Zen 4, where the x loads themselves bind
// (bench/results/kernels-cpu-notes.md); kept because it costs nothing.
at::Tensor padded_rows(const at::Tensor& x, at::ScalarType dtype, int64_t per_line) {
  const int64_t in = x.size(1);
  const int64_t ld = ((in + per_line - 1) / per_line) * per_line + per_line;
  at::Tensor buf = at::empty({x.size(0), ld}, x.options().dtype(dtype));
  at::Tensor view = buf.narrow(1, 0, in);
  view.copy_(x);
  return view;
}

}  // namespace

at::Tensor padded_rows_f32(const at::Tensor& x) { return padded_rows(x, at::kFloat, 16); }

at::Tensor group_sums(const at::Tensor& x32, int64_t groups, int64_t group_size) {
  if (groups == 1) return x32.sum(1, /*keepdim=*/true).contiguous();
  const int64_t in = x32.size(1);
  const at::Tensor x = at::constant_pad_nd(x32, {0, groups * group_size - in});
  return x.view({x32.size(0), groups, group_size}).sum(-1).contiguous();
}

void run_gemv(const at::Tensor& w, int64_t ldw, int64_t out, int64_t in, const at::Tensor& x32,
              bool x_exact, const std::vector<Chunk>& chunks, const SignSet* signs,
              at::Tensor& y32) {
  if (chunks.empty() || out == 0) return;
  GemvArgs a;
  a.dtype = float_dtype(w, "gemv", "w");
  a.w = w.data_ptr();
  a.ldw = ldw;
  a.out = out;
  a.in = in;
  a.x = x32.data_ptr<float>();
  a.ldx = x32.stride(0);
  a.y = y32.data_ptr<float>();
  a.ldy = y32.size(1);
  a.chunks = chunks.data();
  a.nchunks = int64_t(chunks.size());
  const KernelTable& k = kernels();
  at::Tensor xb, xsum, zeros;
  if (k.bf16_dot && a.dtype == DType::bf16 && x_exact) {
    xb = padded_rows(x32, at::kBFloat16, 32);  // exact: the values came from bf16
    a.xb = reinterpret_cast<const uint16_t*>(xb.data_ptr());
    a.ldxb = xb.stride(0);
  }
  if (signs) {
    a.signs = *signs;
    xsum = group_sums(x32, signs->groups, signs->group_size);
    a.xsum = xsum.data_ptr<float>();
    zeros = at::zeros({std::max<int64_t>(signs->nb, 1)}, at::kByte);
    a.zero_bits = zeros.data_ptr<uint8_t>();
  }
  // Rows are independent; ~16 KB of weights per task keeps thread start-up negligible.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(in, 1));
  parallel_rows(out, grain, [&](int64_t i0, int64_t i1) { k.gemv(a, i0, i1); });
}

std::vector<Chunk> plain_chunks(int64_t rows) {
  const int max_rows = kernels().plain_rows;
  std::vector<Chunk> out;
  for (int64_t n = 0; n < rows; n += max_rows) {
    Chunk c;
    c.row = n;
    c.nr = int32_t(std::min<int64_t>(max_rows, rows - n));
    out.push_back(c);
  }
  return out;
}

}  // namespace qmerge::cpu
