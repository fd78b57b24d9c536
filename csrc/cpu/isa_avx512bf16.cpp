// The bf16 GEMV compiled for AVX-512 + AVX512-BF16 (vdpbf16ps: Zen 4, Sapphire Rapids and
// later); every other kernel of this level is isa_avx512.cpp's. Only isa.cpp calls into it,
// after checking the CPU.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(                                                          \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#endif

#define QMERGE_ISA avx512bf16
#define QMERGE_ISA_NAME "avx512bf16"
#define QMERGE_ISA_BF16DOT 1
#define QMERGE_ISA_MAX_ROWS 4
// Base-only chunks of four x rows (not avx512's eight): four weight rows per pass fit their 16
// accumulators, and at N = 8 two such passes beat one pass of two weight rows (bf16 4096x4096:
// 1.6 vs 1.95 ms in a standalone copy of the loop, bench/results/kernels-cpu-notes.md).
#define QMERGE_ISA_PLAIN_ROWS 4
#include "simd/avx512.h"
#include "kernels/table.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
