// The kernels of kernels/*.h compiled for the baseline x86-64 (or any) target, one lane at a
// time: runs everywhere, and is tested against the vector paths.
#include <cstdint>

#include "kernels.h"

#define QMERGE_ISA scalar
#define QMERGE_ISA_NAME "scalar"
#define QMERGE_ISA_MAX_ROWS 4
#include "simd/scalar.h"
#include "kernels/table.h"
