// The kernels of kernels/*.h compiled for AVX-512 (F, BW, VL, DQ) + FMA + F16C. Only this file
// is compiled for that target, and only isa.cpp calls into it, after checking the CPU.
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push( \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

#define QMERGE_ISA avx512
#define QMERGE_ISA_NAME "avx512"
#define QMERGE_ISA_PLAIN_ROWS 8
#define QMERGE_ISA_ROUTED_ROWS 4
#define QMERGE_ISA_MAX_ROWS 4
#define QMERGE_ISA_LUT512 1  // sign_lut with vpermw (AVX512BW)
#include "simd/avx512.h"
#include "kernels/table.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
