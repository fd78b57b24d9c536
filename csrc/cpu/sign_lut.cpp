// The lookup-table sign terms of mixed batches (sign_lut.h; kernel: kernels/sign_lut.h).
#include "sign_lut.h"

#include <c10/core/Storage.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
using Key = std::tuple<const void*, int64_t, int64_t, int64_t, int64_t>;

void relayout(const at::Tensor& packed, at::Tensor& dst) {
  const int64_t tasks = packed.size(0), out = packed.size(1), nb = packed.size(2);
  const int64_t tiles = (out + kLutTile - 1) / kLutTile;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  parallel_rows(tasks * tiles, 8, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / tiles, tile = k % tiles;
      uint8_t* tile_dst = d + k * nb * kLutTile;
      for (int o = 0; o < kLutTile; ++o) {
        const int64_t row = tile * kLutTile + o;
        if (row >= out) {
          for (int64_t b = 0; b < nb; ++b) tile_dst[b * kLutTile + o] = 0;
          continue;
        }
        const uint8_t* s = src + (t * out + row) * nb;
        for (int64_t b = 0; b < nb; ++b) tile_dst[b * kLutTile + o] = s[b];
      }
    }
  });
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

at::Tensor lut_layout(const at::Tensor& packed) {
  static std::mutex mu;
  static std::map<Key, Cached> cache;
  const Key key{packed.data_ptr(), packed.size(0), packed.size(1), packed.size(2),
                packed._version()};
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end();) {  // forget tensors that are gone
      it = it->second.owner.expired() ? cache.erase(it) : std::next(it);
    }
    auto it = cache.find(key);
    if (it != cache.end()) return it->second.relaid;
  }
  const int64_t tiles = (packed.size(1) + kLutTile - 1) / kLutTile;
  at::Tensor relaid =
      at::empty({packed.size(0), tiles, packed.size(2), kLutTile}, packed.options());
  relayout(packed, relaid);
  std::lock_guard<std::mutex> lock(mu);
  cache.insert_or_assign(key, Cached{packed.storage().getWeakStorageImpl(), relaid});
  return relaid;
}

void add_sign_terms_lut(const at::Tensor& x, const at::Tensor& packed, const SignSet& s,
                        const Routes& r, at::Tensor& y32) {
  const int64_t out = s.out, nb = s.nb;
  // Rows with terms get tables; pairs (row, task) are ordered by task.
  std::vector<int64_t> used;
  std::vector<int32_t> table_of(r.rows(), -1);
  std::vector<std::vector<std::pair<int32_t, float>>> by_task(packed.size(0));
  for (int64_t n = 0; n < r.rows(); ++n) {
    if (r.terms(n) == 0) continue;
    table_of[n] = int32_t(used.size());
    used.push_back(n);
    for (int64_t k = r.offset[n]; k < r.offset[n + 1]; ++k) {
      by_task[r.task[k]].push_back({int32_t(n), r.coeff[k]});
    }
  }
  if (used.empty()) return;
  static const bool trace = std::getenv("QMERGE_LUT_TRACE") != nullptr;
  auto t0 = std::chrono::steady_clock::now();
#define TRACE(what)                                                     \
  if (trace) {                                                          \
    auto t1 = std::chrono::steady_clock::now();                         \
    std::fprintf(stderr, "%s %.3f ms\n", what,                          \
                 std::chrono::duration<double>(t1 - t0).count() * 1e3); \
    t0 = t1;                                                            \
  }
  std::vector<int32_t> pair_task, pair_row, pair_n;
  std::vector<float> pair_coeff;
  for (int32_t t = 0; t < int32_t(by_task.size()); ++t) {
    for (const auto& [n, c] : by_task[t]) {
      pair_task.push_back(t);
      pair_row.push_back(table_of[n]);
      pair_n.push_back(n);
      pair_coeff.push_back(c);
    }
  }
  TRACE("pairs");
  const bool all = int64_t(used.size()) == r.rows();
  const at::Tensor x32 =
      (all ? x : x.index_select(0, at::tensor(used, at::kLong))).to(at::kFloat).contiguous();
  TRACE("x32");
  thread_local std::vector<int16_t> tables_buf;
  thread_local std::vector<int32_t> acc_buf;
  int16_t* tables = reuse(tables_buf, used.size() * 2 * nb * 32);
  std::vector<float> d(used.size());
  const KernelTable& k = kernels();
  LutTableArgs ta;
  ta.x = x32.data_ptr<float>();
  ta.in = x32.size(1);
  ta.nb = nb;
  ta.tables = tables;
  ta.d = d.data();
  parallel_rows(int64_t(used.size()), 1, [&](int64_t n0, int64_t n1) { k.lut_tables(ta, n0, n1); });
  TRACE("tables");

  const at::Tensor relaid = lut_layout(packed);
  LutArgs a;
  a.idx = relaid.data_ptr<uint8_t>();
  a.nb = nb;
  a.tiles = relaid.size(1);
  a.tables = tables;
  a.pair_task = pair_task.data();
  a.pair_row = pair_row.data();
  a.pairs = int64_t(pair_task.size());
  a.acc = reuse(acc_buf, a.pairs * a.tiles * kLutTile);
  TRACE("layout");
  parallel_rows(a.tiles, 4, [&](int64_t t0, int64_t t1) {
    k.sign_lut(a, t0, t1);
    // y += c * d * scale * acc for these tiles' outputs (rows of y are split by tile: no race).
    const int64_t i0 = t0 * kLutTile, i1 = std::min(out, t1 * kLutTile);
    for (int64_t p = 0; p < a.pairs; ++p) {
      const float f = pair_coeff[p] * d[pair_row[p]];
      const int32_t* ap = a.acc + p * a.tiles * kLutTile;
      float* yp = y32.data_ptr<float>() + int64_t(pair_n[p]) * y32.size(1);
      for (int64_t i = i0; i < i1; ++i) yp[i] += f * s.scale_row(pair_task[p], i)[0] * float(ap[i]);
    }
  });
  TRACE("kernel");
}

}  // namespace qmerge::cpu
