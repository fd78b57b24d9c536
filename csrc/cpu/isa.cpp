#include "isa.h"

#include <atomic>
#include <cstdlib>

#include <c10/util/Exception.h>

namespace qmerge::cpu {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

Isa parse(const std::string& name) {
  if (name == "avx512bf16") return Isa::avx512bf16;
  if (name == "avx512") return Isa::avx512;
  if (name == "avx2") return Isa::avx2;
  if (name == "scalar") return Isa::scalar;
  TORCH_CHECK_VALUE(false, "qmerge: unknown instruction set '", name,
                    "': expected 'avx512bf16', 'avx512', 'avx2', 'scalar' or 'auto'");
}

std::atomic<int>& forced() {
  // -1: not chosen yet; read QMERGE_ISA on first use.
  static std::atomic<int> value{-1};
  return value;
}

}  // namespace

Isa best_isa() {
  static const Isa best = cpu_has_avx512bf16() ? Isa::avx512bf16
                          : cpu_has_avx512()   ? Isa::avx512
                          : cpu_has_avx2()     ? Isa::avx2
                                               : Isa::scalar;
  return best;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::scalar: return "scalar";
  }
  return "?";
}

void set_isa(const std::string& name) {
  if (name == "auto" || name.empty()) {
    forced().store(int(best_isa()));
    return;
  }
  const Isa want = parse(name);
  TORCH_CHECK_VALUE(int(want) <= int(best_isa()), "qmerge: instruction set '", name,
                    "' is not supported by this CPU (best: ", isa_name(best_isa()), ")");
  forced().store(int(want));
}

Isa active_isa() {
  int v = forced().load();
  if (v < 0) {
    const char* env = std::getenv("QMERGE_ISA");
    set_isa(env ? env : "auto");
    v = forced().load();
  }
  return Isa(v);
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int k = int(best_isa()); k >= 0; --k) out.push_back(isa_name(Isa(k)));
  return out;
}

const KernelTable& kernels() {
  switch (active_isa()) {
    case Isa::avx512bf16: return avx512bf16::table();
    case Isa::avx512: return avx512::table();
    case Isa::avx2: return avx2::table();
    case Isa::scalar: break;
  }
  return scalar::table();
}

}  // namespace qmerge::cpu
