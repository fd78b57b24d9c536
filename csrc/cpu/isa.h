// Choosing the instruction set at run time.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace qmerge::cpu {

// The best instruction set this CPU (and OS) supports.
Isa best_isa();
// The one in use: best_isa() unless QMERGE_ISA or set_isa() chose a lower one.
Isa active_isa();
// Forces an instruction set ("avx512bf16", "avx512", "avx2", "scalar" or "auto"); refuses one the
// CPU lacks.
void set_isa(const std::string& name);
std::string isa_name(Isa isa);
std::vector<std::string> supported_isas();
// The kernels of the active instruction set.
const KernelTable& kernels();

}  // namespace qmerge::cpu
