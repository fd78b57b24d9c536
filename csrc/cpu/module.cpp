// The Python module qmerge._C: importing it registers the CPU kernels (the TORCH_LIBRARY_IMPL
// blocks of the op files) and exposes the instruction-set controls.
#include <torch/extension.h>

#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = qmerge::cpu;
  m.doc() = "qmerge native CPU kernels";
  m.def(
      "best_isa", [] { return cpu::isa_name(cpu::best_isa()); },
      "Best instruction set this CPU supports.");
  m.def(
      "active_isa", [] { return cpu::isa_name(cpu::active_isa()); },
      "Instruction set the kernels use now.");
  m.def("set_isa", &cpu::set_isa, pybind11::arg("name"),
        "Force 'avx512', 'avx2' or 'scalar' (or 'auto'); refuses one the CPU lacks.");
  m.def("supported_isas", &cpu::supported_isas, "Instruction sets this CPU supports, best first.");
}
