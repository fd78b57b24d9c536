// The kernels of kernels/*.h compiled for AVX2 + FMA + F16C (16 vector registers: smaller
// chunks than AVX-512). Only isa.cpp calls into it, after checking the CPU.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif

#define QMERGE_ISA avx2
#define QMERGE_ISA_NAME "avx2"
#define QMERGE_ISA_PLAIN_ROWS 4
#define QMERGE_ISA_ROUTED_ROWS 2
#include "simd/avx2.h"
#include "kernels/table.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
