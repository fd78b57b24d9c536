// The lookup-table sign terms of mixed batches (sign_lut.h; kernel: kernels/sign_lut.h).
#include "sign_lut.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Storage.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "checks.h"
#include "isa.h"

namespace qmerge::cpu {
namespace {

struct Cached {
  c10::weak_intrusive_ptr<c10::StorageImpl> owner;
  at::Tensor relaid;
};
using Key = std::tuple<const void*, int64_t, int64_t, int64_t, int64_t, bool>;

// Words of 15 bits per output row: ceil(8 nb / 15) (columns past `in` hold zero activations).
int64_t lut_words(int64_t nb) { return (8 * nb + 14) / 15; }
// Words of 32 bits per output row for the fp32 kernel: ceil(nb / 4).
int64_t lut_f32_words(int64_t nb) { return (nb + 3) / 4; }

// Each output row's bits as nw words (word_of(the row's bytes, w), the bytes zero-padded past
// nb), transposed to [T, tiles, nw, kLutTile]; rows past `out` are zero.
template <class Word, class WordOf>
void relayout(const at::Tensor& packed, Word* d, int64_t nw, WordOf word_of) {
  const int64_t tasks = packed.size(0), out = packed.size(1), nb = packed.size(2);
  const int64_t tiles = (out + kLutTile - 1) / kLutTile;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  parallel_rows(tasks * tiles, 8, [&](int64_t k0, int64_t k1) {
    std::vector<uint8_t> row_bytes(std::max(nb + 8, 4 * nw), 0);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / tiles, tile = k % tiles;
      Word* tile_dst = d + k * nw * kLutTile;
      for (int o = 0; o < kLutTile; ++o) {
        const int64_t row = tile * kLutTile + o;
        if (row < out) {
          std::memcpy(row_bytes.data(), src + (t * out + row) * nb, nb);
        } else {
          std::fill(row_bytes.begin(), row_bytes.end(), 0);
        }
        for (int64_t w = 0; w < nw; ++w) tile_dst[w * kLutTile + o] = word_of(row_bytes.data(), w);
      }
    }
  });
}

// The int16 kernel's words: columns 15w .. 15w+14, LSB first.
uint16_t word15(const uint8_t* row, int64_t w) {
  const int64_t c = 15 * w;
  uint32_t v;
  std::memcpy(&v, row + (c >> 3), sizeof v);
  return uint16_t((v >> (c & 7)) & 0x7FFF);
}

// The fp32 kernel's words: the packed bytes as they are, 32 columns each.
uint32_t word32(const uint8_t* row, int64_t w) {
  uint32_t v;
  std::memcpy(&v, row + 4 * w, sizeof v);
  return v;
}

// A per-thread buffer reused across calls: fresh multi-megabyte buffers come back from glibc
// as fresh pages, faulted in on every call (costly on this project's VM:
// bench/results/routing-notes.md). Holds the largest size asked for.
template <class T>
T* reuse(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

at::Tensor lut_layout(const at::Tensor& packed, bool f32) {
  static std::mutex mu;
  static std::map<Key, Cached> cache;
  const Key key{packed.data_ptr(), packed.size(0),    packed.size(1),
                packed.size(2),    packed._version(), f32};
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end();) {  // forget tensors that are gone
      it = it->second.owner.expired() ? cache.erase(it) : std::next(it);
    }
    auto it = cache.find(key);
    if (it != cache.end()) return it->second.relaid;
  }
  const int64_t tiles = (packed.size(1) + kLutTile - 1) / kLutTile;
  const int64_t nw = f32 ? lut_f32_words(packed.size(2)) : lut_words(packed.size(2));
  at::Tensor relaid = at::empty({packed.size(0), tiles, nw, kLutTile},
                                packed.options().dtype(f32 ? at::kInt : at::kShort));
  if (f32) {
    relayout(packed, reinterpret_cast<uint32_t*>(relaid.data_ptr<int32_t>()), nw, word32);
  } else {
    relayout(packed, reinterpret_cast<uint16_t*>(relaid.data_ptr<int16_t>()), nw, word15);
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.insert_or_assign(key, Cached{packed.storage().getWeakStorageImpl(), relaid});
  return relaid;
}

namespace {

// y[i] = y[i] + delta[i], rounded once more to y's dtype.
template <class T>
void add_row(T* y, const float* delta, int64_t count) {
  for (int64_t i = 0; i < count; ++i) y[i] = T(float(y[i]) + delta[i]);
}

void add_row_any(const at::Tensor& y, int64_t n, int64_t i0, const float* delta, int64_t count) {
  const int64_t at = n * y.size(1) + i0;
  switch (y.scalar_type()) {
    case at::kBFloat16: return add_row(y.data_ptr<at::BFloat16>() + at, delta, count);
    case at::kHalf: return add_row(y.data_ptr<at::Half>() + at, delta, count);
    default: return add_row(y.data_ptr<float>() + at, delta, count);
  }
}

// One call's lookup work: the rows with terms, their tables, the (row, task) pairs ordered by
// task, and the kernel's arguments (`a` for int8-quantized rows, `af` for fp32 rows). Buffers
// are the calling thread's (reused across calls).
struct LutBatch {
  std::vector<int64_t> used;  // table row n is x row used[n]
  std::vector<int32_t> pair_task, pair_row;
  std::vector<float> pair_coeff, d;
  at::Tensor relaid;
  bool f32 = false;
  int64_t tiles = 0, pairs = 0;
  LutArgs a;
  LutF32Args af;

  void lookups(int64_t t0, int64_t t1) const {
    if (f32) {
      kernels().sign_lut_f32(af, t0, t1);
    } else {
      kernels().sign_lut(a, t0, t1);
    }
  }
};

// What both kinds of table arguments share: x's used rows, their width, the words per row.
template <class TableArgs>
void row_args(TableArgs& ta, const at::Tensor& x, const LutBatch& b, int64_t nw) {
  ta.ldx = x.size(1);
  ta.rows = b.used.data();
  ta.in = x.size(1);
  ta.nw = nw;
}

// What both kinds of kernel arguments share: the bits' words, the batch's tiles and pairs, the
// tables and the accumulators (a buffer of the calling thread, reused).
template <class Args, class Table, class Acc>
void pair_args(Args& a, const LutBatch& b, int64_t nw, Table* tables, std::vector<Acc>& acc_buf) {
  a.nw = nw;
  a.tiles = b.tiles;
  a.tables = tables;
  a.pair_task = b.pair_task.data();
  a.pair_row = b.pair_row.data();
  a.pairs = b.pairs;
  a.acc = reuse(acc_buf, b.pairs * b.tiles * kLutTile);
}

// The int8 tables of x's used rows (bf16, fp16: x quantized per row).
void int8_tables(const at::Tensor& x, const at::Tensor& packed, const SignSet& s, LutBatch& b) {
  const int64_t nw = lut_words(s.nb);
  LutTableArgs ta;
  const at::Tensor xc = x.contiguous();
  at::Tensor x32;
  if (x.scalar_type() == at::kBFloat16) {
    ta.xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  } else {
    x32 = xc.to(at::kFloat);
    ta.x = x32.data_ptr<float>();
  }
  row_args(ta, x, b, nw);
  thread_local std::vector<int16_t> tables_buf;
  thread_local std::vector<int32_t> acc_buf;
  ta.tables = reuse(tables_buf, b.used.size() * 3 * nw * 32);
  b.d.resize(b.used.size());
  ta.d = b.d.data();
  const KernelTable& k = kernels();
  parallel_rows(int64_t(b.used.size()), 1,
                [&](int64_t n0, int64_t n1) { k.lut_tables(ta, n0, n1); });
  b.relaid = lut_layout(packed, false);
  b.a.idx = reinterpret_cast<const uint16_t*>(b.relaid.data_ptr<int16_t>());
  pair_args(b.a, b, nw, ta.tables, acc_buf);
}

// The fp32 tables of x's used rows (fp32 x, as it is).
void f32_tables(const at::Tensor& x, const at::Tensor& packed, const SignSet& s, LutBatch& b) {
  const int64_t nw = lut_f32_words(s.nb);
  LutF32TableArgs ta;
  const at::Tensor xc = x.contiguous();
  ta.x = xc.data_ptr<float>();
  row_args(ta, x, b, nw);
  thread_local std::vector<float> tables_buf, acc_buf;
  ta.tables = reuse(tables_buf, b.used.size() * 8 * nw * 16);
  const KernelTable& k = kernels();
  parallel_rows(int64_t(b.used.size()), 1,
                [&](int64_t n0, int64_t n1) { k.lut_tables_f32(ta, n0, n1); });
  b.relaid = lut_layout(packed, true);
  b.af.idx = reinterpret_cast<const uint32_t*>(b.relaid.data_ptr<int32_t>());
  pair_args(b.af, b, nw, ta.tables, acc_buf);
}

// Fills `b` for x's rows with terms; false when no row has one.
bool prepare(const at::Tensor& x, const at::Tensor& packed, const SignSet& s, const Routes& r,
             LutBatch& b) {
  std::vector<int32_t> table_of(r.rows(), -1);
  std::vector<std::vector<std::pair<int32_t, float>>> by_task(packed.size(0));
  for (int64_t n = 0; n < r.rows(); ++n) {
    if (r.terms(n) == 0) continue;
    table_of[n] = int32_t(b.used.size());
    b.used.push_back(n);
    for (int64_t k = r.offset[n]; k < r.offset[n + 1]; ++k) {
      by_task[r.task[k]].push_back({int32_t(n), r.coeff[k]});
    }
  }
  if (b.used.empty()) return false;
  for (int32_t t = 0; t < int32_t(by_task.size()); ++t) {
    for (const auto& [n, c] : by_task[t]) {
      b.pair_task.push_back(t);
      b.pair_row.push_back(table_of[n]);
      b.pair_coeff.push_back(c);
    }
  }
  b.f32 = x.scalar_type() == at::kFloat;
  b.tiles = (s.out + kLutTile - 1) / kLutTile;
  b.pairs = int64_t(b.pair_task.size());
  if (b.f32) {
    f32_tables(x, packed, s, b);
  } else {
    int8_tables(x, packed, s, b);
  }
  return true;
}

// dp[i - i0] += f * scale[i] * acc[i] over [i0, i1) (one scale for all rows when scale_rows == 1).
template <class A>
void add_pair(float* dp, const float* sc, int64_t scale_rows, float f, const A* ap, int64_t i0,
              int64_t i1) {
  if (scale_rows == 1) {
    for (int64_t i = i0; i < i1; ++i) dp[i - i0] += f * sc[0] * float(ap[i]);
  } else {
    for (int64_t i = i0; i < i1; ++i) dp[i - i0] += f * sc[i] * float(ap[i]);
  }
}

// y[:, tiles [t0, t1)] += each row's sum over its pairs of c * d * scale * acc (d = 1 for fp32
// rows; threads own disjoint columns of y: no race).
void epilogue(const LutBatch& b, const SignSet& s, int64_t t0, int64_t t1, at::Tensor& y) {
  const int64_t rows = int64_t(b.used.size());
  const int64_t i0 = t0 * kLutTile, i1 = std::min(s.out, t1 * kLutTile), w = i1 - i0;
  thread_local std::vector<float> delta_buf;
  float* delta = reuse(delta_buf, size_t(rows * w));
  std::fill(delta, delta + rows * w, 0.0f);
  for (int64_t p = 0; p < b.pairs; ++p) {
    float* dp = delta + b.pair_row[p] * w;             // column i0 + k at dp[k]
    const float* sc = s.scale_row(b.pair_task[p], 0);  // G = 1: one scale per row, or per tensor
    const int64_t at = p * b.tiles * kLutTile;
    if (b.f32) {
      add_pair(dp, sc, s.scale_rows, b.pair_coeff[p], b.af.acc + at, i0, i1);
    } else {
      const float f = b.pair_coeff[p] * b.d[b.pair_row[p]];
      add_pair(dp, sc, s.scale_rows, f, b.a.acc + at, i0, i1);
    }
  }
  for (int64_t n = 0; n < rows; ++n) add_row_any(y, b.used[n], i0, delta + n * w, w);
}

// Few rows: qmerge's GEMV for the base (fp32 out), the terms added before one rounding.
at::Tensor gemv_and_terms(const at::Tensor& x, const at::Tensor& base_w, const SignSet& s,
                          const LutBatch& b, const std::optional<at::Tensor>& bias) {
  const int64_t in = x.size(1);
  at::Tensor y32 = at::zeros({x.size(0), s.out}, x.options().dtype(at::kFloat));
  run_gemv(base_w, in, s.out, in, padded_rows_f32(x), /*x_exact=*/true, plain_chunks(x.size(0)),
           nullptr, y32);
  if (bias) y32.add_(bias->to(at::kFloat));
  parallel_rows(b.tiles, 4, [&](int64_t t0, int64_t t1) {
    b.lookups(t0, t1);
    epilogue(b, s, t0, t1, y32);
  });
  return y32.to(x.scalar_type());
}

// x W^T (+ bias) through oneDNN's matmul on the plain weight, where torch was built with it
// (mkldnn::_linear_pointwise, reached through the dispatcher: it is no public ATen function);
// nullopt where it is missing or refuses the call. Taken for fp32 weights of kOnednnMinWeight
// elements or more: with the lookups of 32 rows over 5 tasks it costs 0.75-0.94x the per-thread
// GEMMs from 2048x2048 up (SmolLM2-135M's tied 49152x576 head 0.79x), and 1.03-1.17x below
// 2M elements, where the per-thread GEMMs overlap the other core's lookups
// (bench/results/kernels-cpu-notes.md).
constexpr int64_t kOnednnMinWeight = int64_t(1) << 22;

std::optional<at::Tensor> onednn_linear(const at::Tensor& x, const at::Tensor& w,
                                        const at::Tensor& bias) {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!op || !w.is_contiguous() || w.scalar_type() != at::kFloat) return std::nullopt;
  try {
    at::AutoDispatchBelowAutograd below_autograd;
    torch::jit::Stack stack{x,
                            w,
                            bias.defined() ? c10::IValue(bias) : c10::IValue(),
                            "none",
                            c10::List<std::optional<at::Scalar>>(),
                            c10::IValue()};
    op->callBoxed(stack);
    return stack.at(0).toTensor();
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

bool onednn_enabled() {
  const char* v = std::getenv("QMERGE_ONEDNN");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

}  // namespace

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& base_w, const at::Tensor& packed,
                      const SignSet& s, const Routes& r, const std::optional<at::Tensor>& bias) {
  const at::Tensor bv = bias ? bias->to(x.scalar_type()) : at::Tensor();
  LutBatch b;
  if (!prepare(x, packed, s, r, b)) return at::linear(x, base_w, bv);
  if (x.size(0) <= kLutOwnGemvRows) return gemv_and_terms(x, base_w, s, b, bias);
  const at::Tensor xc = x.contiguous();
  if (b.f32 && base_w.numel() >= kOnednnMinWeight && onednn_enabled()) {
    if (std::optional<at::Tensor> base = onednn_linear(xc, base_w, bv)) {
      at::Tensor y = *base;
      parallel_rows(b.tiles, 4, [&](int64_t t0, int64_t t1) {
        b.lookups(t0, t1);
        epilogue(b, s, t0, t1, y);
      });
      return y;
    }
  }
  at::Tensor y = at::empty({x.size(0), s.out}, x.options());
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t per = (b.tiles + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
    at::AutoDispatchBelowAutograd below_autograd;  // workers do not inherit the grad mode
    for (int64_t j = k0; j < k1; ++j) {
      const int64_t t0 = j * per, t1 = std::min(b.tiles, t0 + per);
      if (t0 >= t1) continue;
      const int64_t o0 = t0 * kLutTile, o1 = std::min(s.out, t1 * kLutTile);
      at::Tensor dst = y.narrow(1, o0, o1 - o0);
      const at::Tensor w = base_w.narrow(0, o0, o1 - o0);
      auto gemm = [&] {
        if (bv.defined()) {
          at::addmm_out(dst, bv.narrow(0, o0, o1 - o0), xc, w.t());
        } else {
          at::mm_out(dst, xc, w.t());
        }
      };
      // Odd threads look up first, even threads after their GEMM: the lookups stream the
      // bits from memory while the other core's GEMM computes, instead of every core
      // streaming bits at once.
      if (j % 2) {
        b.lookups(t0, t1);
        gemm();
      } else {
        gemm();
        b.lookups(t0, t1);
      }
      epilogue(b, s, t0, t1, y);
    }
  });
  return y;
}

}  // namespace qmerge::cpu
