// The lookup-table sign terms of mixed batches (sign_lut.h; kernel: kernels/sign_lut.h).
#include "sign_lut.h"

#include <c10/core/Storage.h>

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
using Key = std::tuple<const void*, int64_t, int64_t, int64_t, int64_t>;

// Words of 15 bits per output row: ceil(8 nb / 15) (columns past `in` hold zero activations).
int64_t lut_words(int64_t nb) { return (8 * nb + 14) / 15; }

void relayout(const at::Tensor& packed, at::Tensor& dst) {
  const int64_t tasks = packed.size(0), out = packed.size(1), nb = packed.size(2);
  const int64_t tiles = (out + kLutTile - 1) / kLutTile, nw = lut_words(nb);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint16_t* d = reinterpret_cast<uint16_t*>(dst.data_ptr<int16_t>());
  parallel_rows(tasks * tiles, 8, [&](int64_t k0, int64_t k1) {
    std::vector<uint8_t> row_bytes(nb + 8, 0);  // zero-padded: 32-bit reads past the end
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = k / tiles, tile = k % tiles;
      uint16_t* tile_dst = d + k * nw * kLutTile;
      for (int o = 0; o < kLutTile; ++o) {
        const int64_t row = tile * kLutTile + o;
        if (row < out) {
          std::memcpy(row_bytes.data(), src + (t * out + row) * nb, nb);
        } else {
          std::fill(row_bytes.begin(), row_bytes.end(), 0);
        }
        for (int64_t w = 0; w < nw; ++w) {  // columns 15w .. 15w+14, LSB first
          const int64_t c = 15 * w;
          uint32_t v;
          std::memcpy(&v, row_bytes.data() + (c >> 3), sizeof v);
          tile_dst[w * kLutTile + o] = uint16_t((v >> (c & 7)) & 0x7FFF);
        }
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
  at::Tensor relaid = at::empty({packed.size(0), tiles, lut_words(packed.size(2)), kLutTile},
                                packed.options().dtype(at::kShort));
  relayout(packed, relaid);
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

}  // namespace

void add_sign_terms_lut(const at::Tensor& x, const at::Tensor& packed, const SignSet& s,
                        const Routes& r, at::Tensor& y) {
  const int64_t out = s.out, nw = lut_words(s.nb);
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
  std::vector<int32_t> pair_task, pair_row;
  std::vector<float> pair_coeff;
  for (int32_t t = 0; t < int32_t(by_task.size()); ++t) {
    for (const auto& [n, c] : by_task[t]) {
      pair_task.push_back(t);
      pair_row.push_back(table_of[n]);
      pair_coeff.push_back(c);
    }
  }
  const KernelTable& k = kernels();
  LutTableArgs ta;
  const at::Tensor xc = x.contiguous();
  at::Tensor x32;
  if (x.scalar_type() == at::kBFloat16) {
    ta.xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  } else {
    x32 = xc.to(at::kFloat);
    ta.x = x32.data_ptr<float>();
  }
  ta.ldx = x.size(1);
  ta.rows = used.data();
  ta.in = x.size(1);
  ta.nw = nw;
  thread_local std::vector<int16_t> tables_buf;
  thread_local std::vector<int32_t> acc_buf;
  ta.tables = reuse(tables_buf, used.size() * 3 * nw * 32);
  std::vector<float> d(used.size());
  ta.d = d.data();
  parallel_rows(int64_t(used.size()), 1, [&](int64_t n0, int64_t n1) { k.lut_tables(ta, n0, n1); });

  const at::Tensor relaid = lut_layout(packed);
  LutArgs a;
  a.idx = reinterpret_cast<const uint16_t*>(relaid.data_ptr<int16_t>());
  a.nw = nw;
  a.tiles = relaid.size(1);
  a.tables = ta.tables;
  a.pair_task = pair_task.data();
  a.pair_row = pair_row.data();
  a.pairs = int64_t(pair_task.size());
  a.acc = reuse(acc_buf, a.pairs * a.tiles * kLutTile);
  const int64_t rows = int64_t(used.size());
  parallel_rows(a.tiles, 4, [&](int64_t t0, int64_t t1) {
    k.sign_lut(a, t0, t1);
    // Each row's sum over its pairs of c * d * scale * acc, then added into y (threads own
    // disjoint columns of y: no race).
    const int64_t i0 = t0 * kLutTile, i1 = std::min(out, t1 * kLutTile), w = i1 - i0;
    thread_local std::vector<float> delta_buf;
    float* delta = reuse(delta_buf, size_t(rows * w));
    std::fill(delta, delta + rows * w, 0.0f);
    for (int64_t p = 0; p < a.pairs; ++p) {
      const float f = pair_coeff[p] * d[pair_row[p]];
      const int32_t* ap = a.acc + p * a.tiles * kLutTile;
      float* dp = delta + pair_row[p] * w;             // column i0 + k at dp[k]
      const float* sc = s.scale_row(pair_task[p], 0);  // G = 1: one scale per row, or per tensor
      if (s.scale_rows == 1) {
        for (int64_t i = i0; i < i1; ++i) dp[i - i0] += f * sc[0] * float(ap[i]);
      } else {
        for (int64_t i = i0; i < i1; ++i) dp[i - i0] += f * sc[i] * float(ap[i]);
      }
    }
    for (int64_t n = 0; n < rows; ++n) add_row_any(y, used[n], i0, delta + n * w, w);
  });
}

}  // namespace qmerge::cpu
