// Reading sign bits at any column (DESIGN.md bit layout: LSB first, 8 columns per byte).
#pragma once

#include <cstdint>

#ifndef QMERGE_ISA
#error "kernels/*.h are compiled once per instruction set: include them from an isa_*.cpp file"
#endif

#define QM_INLINE inline __attribute__((always_inline))
#define QM_INLINE_LAMBDA __attribute__((always_inline))

namespace qmerge::cpu::QMERGE_ISA {

// The 32 bits of columns c .. c+31 (zero past the row's end; the caller masks what it does
// not use). Safe at any column: never reads past the row's nb bytes.
QM_INLINE uint32_t bits32_any(const uint8_t* row, int64_t c, int64_t nb) {
  const int64_t b = c >> 3;
  uint64_t v = 0;
  if (b + 8 <= nb) {
    __builtin_memcpy(&v, row + b, 8);
  } else {
    for (int64_t k = 0; b + k < nb && k < 5; ++k) v |= uint64_t(row[b + k]) << (8 * k);
  }
  return uint32_t(v >> (c & 7));
}

QM_INLINE uint32_t low_bits(int n) { return n >= 32 ? ~0u : ((1u << n) - 1u); }

QM_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace qmerge::cpu::QMERGE_ISA
