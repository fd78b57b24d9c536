// The kernels of kernels/*.h compiled for the baseline x86-64 (or any) target, one lane at a
// time: runs everywhere, and is tested against the vector paths.
#include <cstdint>

#include "kernels.h"

#define QMERGE_ISA scalar
#define QMERGE_ISA_NAME "scalar"
#define QMERGE_ISA_PLAIN_ROWS 4
#define QMERGE_ISA_ROUTED_ROWS 2
#include "simd/scalar.h"
#include "kernels/table.h"
