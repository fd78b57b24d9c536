// The kernel table of one instruction set: dtype dispatch for every kernel.
#pragma once

#include "kernels/gemv.h"
#ifndef QMERGE_ISA_BF16DOT
#include "kernels/dequant.h"
#include "kernels/pack.h"
#include "kernels/sign_lut.h"
#include "kernels/sign_lut_f32.h"
#endif

namespace qmerge::cpu::QMERGE_ISA {

#ifdef QMERGE_ISA_BF16DOT
// Only the bf16 GEMV differs from the AVX-512 table: everything else is its kernels.
inline void gemv_bf16_or_base(const GemvArgs& a, int64_t i0, int64_t i1) {
  if (a.dtype == DType::bf16) return gemv_rows<TagBF16>(a, i0, i1);
  return avx512::table().gemv(a, i0, i1);
}

const KernelTable& table() {
  const KernelTable& b = avx512::table();
  static const KernelTable t{QMERGE_ISA_NAME, QMERGE_ISA_PLAIN_ROWS,
                             b.routed_rows,   true,
                             b.pack,          b.unpack,
                             b.dequant,       &gemv_bf16_or_base,
                             b.lut_vector,    b.sign_lut,
                             b.lut_tables,    b.sign_lut_f32,
                             b.lut_tables_f32};
  return t;
}
#else

#define QM_BY_DTYPE(FN, ARGS, R0, R1)                   \
  switch (ARGS.dtype) {                                 \
    case DType::f32: return FN<TagF32>(ARGS, R0, R1);   \
    case DType::f16: return FN<TagF16>(ARGS, R0, R1);   \
    case DType::bf16: return FN<TagBF16>(ARGS, R0, R1); \
  }

inline void pack_any(const PackArgs& a, int64_t r0, int64_t r1) {
  QM_BY_DTYPE(pack_rows, a, r0, r1)
}
inline void unpack_any(const UnpackArgs& a, int64_t r0, int64_t r1) {
  QM_BY_DTYPE(unpack_rows, a, r0, r1)
}
inline void dequant_any(const DequantArgs& a, int64_t r0, int64_t r1) {
  QM_BY_DTYPE(dequant_rows, a, r0, r1)
}
inline void gemv_any(const GemvArgs& a, int64_t i0, int64_t i1) {
  QM_BY_DTYPE(gemv_rows, a, i0, i1)
}

#undef QM_BY_DTYPE

#ifdef QMERGE_ISA_LUT512
constexpr bool kLutVector = true;
#else
constexpr bool kLutVector = false;
#endif

const KernelTable& table() {
  static const KernelTable t{QMERGE_ISA_NAME,
                             QMERGE_ISA_PLAIN_ROWS,
                             QMERGE_ISA_ROUTED_ROWS,
                             false,
                             &pack_any,
                             &unpack_any,
                             &dequant_any,
                             &gemv_any,
                             kLutVector,
                             &sign_lut,
                             &lut_tables,
                             &sign_lut_f32,
                             &lut_tables_f32};
  return t;
}
#endif

}  // namespace qmerge::cpu::QMERGE_ISA
