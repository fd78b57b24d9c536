// The one translation unit that defines the kernels of kernels.cuh (the op files only declare
// them): the same text NVRTC compiles for the CuPy fallback.
#include "kernels.cuh"
