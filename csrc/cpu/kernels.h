// The interface between the torch-facing op files (pack_signs.cpp, dequant_add_sign.cpp, ...)
// and the per-instruction-set kernels (isa_avx512.cpp, isa_avx2.cpp, isa_scalar.cpp).
//
// This header includes no torch header on purpose: the ISA translation units are compiled with
// a target pragma, and any inline function they shared with the rest of the extension could be
// merged by the linker into its AVX-512 copy (the ODR hazard PyTorch avoids with its
// CPU_CAPABILITY namespaces). Everything here is plain data and function pointers.
#pragma once

#include <cstdint>

namespace qmerge::cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };
// Ordered: each level's CPU requirements include the ones below it. avx512bf16 adds the
// AVX512-BF16 dot product (vdpbf16ps) for bf16 GEMVs; its other kernels are avx512's.
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

// Packed signs and scales of T tasks for one weight [out, in] (layout in shared/DESIGN.md).
struct SignSet {
  const uint8_t* packed = nullptr;  // [T, out, nb], bit j of byte b of a row = sign of column 8b+j
  int64_t nb = 0;                   // bytes per packed row: ceil(in / 8)
  const float* scales = nullptr;    // [T, R, G] fp32
  int64_t scale_rows = 1;           // R: 1 (per tensor) or out (per row / per group)
  int64_t groups = 1;               // G: scale groups along in_features
  int64_t group_size = 0;           // ceil(in / G); group g covers [g*gs, min(in, (g+1)*gs))
  int64_t out = 0;                  // rows per task, to step between tasks

  const uint8_t* bits_row(int64_t task, int64_t row) const {
    return packed + (task * out + row) * nb;
  }
  const float* scale_row(int64_t task, int64_t row) const {
    return scales + (task * scale_rows + (scale_rows == 1 ? 0 : row)) * groups;
  }
};

// out[i, :] = base[i, :] + sum_t ascales[t, i, g(col)] * (2 * bit_t[i, col] - 1), fp32, then
// rounded to dtype. `ascales` already holds alpha_t * scale_t (so the product rounds exactly as
// in the reference). base may be null (a zero base: the dequantized delta alone); out may alias
// base (in-place merge).
struct DequantArgs {
  DType dtype = DType::f32;
  const void* base = nullptr;  // [out, in] or null
  void* dst = nullptr;         // [out, in]
  int64_t in = 0;
  int64_t tasks = 0;
  SignSet signs;        // scales = alpha-premultiplied
  bool stream = false;  // non-temporal stores: dst is larger than the cache and is not
                        // read back at once (skips the read-for-ownership of dst)
};

// One unit of GEMV work for one output row: `nr` consecutive x rows (each with its own
// accumulator) and `np` sign terms. Two shapes are used:
//   nr == np: routed rows, term p belongs to x row p (task ids; task -1 = no term);
//   nr == 1:  one x row with np terms (a mixture over np tasks).
// nr == 0 never occurs. np == 0 means the base GEMV alone.
constexpr int kMaxChunk = 8;
struct Chunk {
  int32_t nr = 0, np = 0;
  int64_t row = 0;               // first x row / output row
  int32_t task[kMaxChunk] = {};  // per term, -1 = none
  float coeff[kMaxChunk] = {};   // per term
};

// y[n, i] += x[n, :] . w[i, :] + sum over the chunk's terms of
//            coeff * sum_g scale[t, i, g] * sum_{col in g} sign_t[i, col] * x[n, col]
// for every chunk and every output row i in [i0, i1). Accumulation is fp32.
struct GemvArgs {
  DType dtype = DType::f32;
  const void* w = nullptr;  // [out, ldw], rows of length `in`
  int64_t ldw = 0;
  int64_t out = 0;  // rows of w (the kernels prefetch ahead, never past the last)
  int64_t in = 0;
  const float* x = nullptr;  // [N, ldx] fp32
  int64_t ldx = 0;
  const uint16_t* xb = nullptr;  // [N, ldxb] x as bf16, set when the values are exactly bf16
  int64_t ldxb = 0;              // (bf16 weights with KernelTable::bf16_dot; else null)
  const float* xsum = nullptr;   // [N, G] per-group sums of x (when signs are used)
  float* y = nullptr;            // [N, ldy] fp32, accumulated into
  int64_t ldy = 0;
  const Chunk* chunks = nullptr;
  int64_t nchunks = 0;
  SignSet signs;                       // unused when every chunk has np == 0
  const uint8_t* zero_bits = nullptr;  // nb zero bytes, the bits of "no task"
};

struct PackArgs {  // packed[r, :] = packbits(src[r, :] >= 0, little); dst pre-zeroed
  DType dtype = DType::f32;
  const void* src = nullptr;  // [rows, in]
  uint8_t* dst = nullptr;     // [rows, nb]
  int64_t in = 0, nb = 0;
};

struct UnpackArgs {  // dst[r, c] = bit ? +1 : -1
  DType dtype = DType::f32;
  const uint8_t* src = nullptr;  // [rows, nb]
  void* dst = nullptr;           // [rows, in]
  int64_t in = 0, nb = 0;
};

// The sign terms of a mixed batch by table lookup (sign_lut.cpp; T-MAC's idea applied to a
// delta): for each (row, task) pair p, the exact integer dot product
//   acc[p, i] = sum_col sign_t[i, col] * q[row_p, col]
// of the task's signs with the row's int8-quantized activations q (|q| <= 127). Per row, each
// group of 5 columns has a table of the 32 signed sums +-q0 +-q1 +-q2 +-q3 +-q4, indexed by the
// 5 sign bits of that group (bit j: column 5g + j), held as int16 (|entry| <= 635): one vpermw
// reads it. The bits are re-laid 3 groups (15 columns) per 16-bit word. Lookups accumulate in
// int16 for at most kLutFlushWords words (48 groups: 48 * 635 = 30480 < 2^15) and are then
// added into int32: the result is exact, the same at every instruction set.
constexpr int kLutTile = 32;        // outputs per tile of the re-laid bits
constexpr int kLutFlushWords = 16;  // words of bits (15 columns each) per int16 run
constexpr int kLutMaxRows = 4;      // pairs of one task sharing a pass over its bits
struct LutArgs {
  const uint16_t* idx = nullptr;       // [T, tiles, nw, kLutTile]: word w of output tile*32 + o,
                                       // bits 5j..5j+4 = the signs of group 3w + j
  int64_t nw = 0, tiles = 0;           // ceil(in / 15); ceil(out / kLutTile)
  const int16_t* tables = nullptr;     // [rows, 3 * nw, 32] per quantized x row
  const int32_t* pair_task = nullptr;  // [P] task of pair p; pairs of one task are adjacent
  const int32_t* pair_row = nullptr;   // [P] table row of pair p
  int64_t pairs = 0;
  int32_t* acc = nullptr;  // [P, tiles * kLutTile] int32, overwritten
};
// Per x row n: d[n] = max|x[n]| / 127, q = round(x[n] / d[n]) (|q| <= 127, 0 past `in`), and
// its tables [3 * nw, 32] at tables + n * 3 * nw * 32 (entry e of group g: the sum over j < 5
// of (bit j of e ? q[5g + j] : -q[5g + j])).
struct LutTableArgs {
  const float* x = nullptr;      // [*, ldx] fp32 rows, or
  const uint16_t* xb = nullptr;  // [*, ldx] bf16 rows (read as they are: no conversion pass)
  int64_t ldx = 0;
  const int64_t* rows = nullptr;  // table row n is x row rows[n]
  int64_t in = 0, nw = 0;
  int16_t* tables = nullptr;
  float* d = nullptr;  // [table rows]
};

// The same sign terms for fp32 activations, not quantized: per row, each group of 4 columns
// has a table of the 16 sums +-x0 +-x1 +-x2 +-x3 in fp32 (entry e: bit j of e set -> +x[4g + j],
// summed in the order j = 0..3), one vpermps reads it, and the lookups add in fp32 in column
// order. Every ISA adds the same values in the same order: the same bits everywhere. The error
// is that of an fp32 dot product of the signs with x, times c * scale (sign_lut.h).
struct LutF32Args {
  const uint32_t* idx = nullptr;       // [T, tiles, nw, kLutTile]: word w of output tile*32 + o,
                                       // bit k = the sign of column 32w + k (the packed bits)
  int64_t nw = 0, tiles = 0;           // ceil(in / 32); ceil(out / kLutTile)
  const float* tables = nullptr;       // [rows, 8 * nw, 16] per x row
  const int32_t* pair_task = nullptr;  // [P] task of pair p; pairs of one task are adjacent
  const int32_t* pair_row = nullptr;   // [P] table row of pair p
  int64_t pairs = 0;
  float* acc = nullptr;  // [P, tiles * kLutTile], overwritten
};
// Per x row n, its tables [8 * nw, 16] at tables + n * 8 * nw * 16 (0 past `in`).
struct LutF32TableArgs {
  const float* x = nullptr;  // [*, ldx] fp32 rows
  int64_t ldx = 0;
  const int64_t* rows = nullptr;  // table row n is x row rows[n]
  int64_t in = 0, nw = 0;
  float* tables = nullptr;
};

// Every kernel works on a row range so the caller can split rows across threads.
struct KernelTable {
  const char* name;
  // Largest chunks this ISA keeps in registers (2 weight rows x chunk rows accumulators):
  int plain_rows;   // (k, 0): base GEMV rows
  int routed_rows;  // (k, k): rows with one task each
  bool bf16_dot;    // gemv on bf16 weights wants GemvArgs::xb (bf16 x bf16 dot products)
  void (*pack)(const PackArgs&, int64_t r0, int64_t r1);
  void (*unpack)(const UnpackArgs&, int64_t r0, int64_t r1);
  void (*dequant)(const DequantArgs&, int64_t r0, int64_t r1);
  void (*gemv)(const GemvArgs&, int64_t i0, int64_t i1);
  bool lut_vector;  // sign_lut is a vector kernel (else the portable loop: only when forced)
  void (*sign_lut)(const LutArgs&, int64_t tile0, int64_t tile1);   // tiles [tile0, tile1)
  void (*lut_tables)(const LutTableArgs&, int64_t n0, int64_t n1);  // rows [n0, n1)
  void (*sign_lut_f32)(const LutF32Args&, int64_t tile0, int64_t tile1);
  void (*lut_tables_f32)(const LutF32TableArgs&, int64_t n0, int64_t n1);
};

namespace avx512bf16 {
const KernelTable& table();
}
namespace avx512 {
const KernelTable& table();
}
namespace avx2 {
const KernelTable& table();
}
namespace scalar {
const KernelTable& table();
}

}  // namespace qmerge::cpu
