// The Python module qmerge._C_cuda: importing it registers the CUDA kernels (the
// TORCH_LIBRARY_IMPL blocks of the op files).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qmerge CUDA kernels (csrc/cuda)";
  m.attr("kernel_source") = "csrc/cuda/kernels.cuh";
}
