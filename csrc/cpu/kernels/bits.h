// Reading sign bits at any column (DESIGN.md bit layout: LSB first, 8 columns per byte).
#pragma once

#include <cstdint>

#ifndef QMERGE_ISA
#error "kernels/*.h are compiled once per instruction set: include them from an isa_*.cpp file"
#endif

#define QM_INLINE inline __attribute__((always_inline))
#define QM_INLINE_LAMBDA __attribute__((always_inline))

namespace qmerge::cpu::QMERGE_ISA {

// Bits of columns c, c+1, ... (at least 24 of them where the row has them; the caller masks).
// Safe at any column: never reads past the row's nb bytes.
QM_INLINE uint32_t bits_any(const uint8_t* row, int64_t c, int64_t nb) {
  const int64_t b = c >> 3;
  uint32_t v = 0;
  if (b + 4 <= nb) {
    __builtin_memcpy(&v, row + b, 4);
  } else {
    for (int64_t k = 0; b + k < nb && k < 4; ++k) v |= uint32_t(row[b + k]) << (8 * k);
  }
  return v >> (c & 7);
}

// The 32 bits of columns c .. c+31 (zero past the row's end). Safe at any column.
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
