#!/usr/bin/env bash
# Compile-only check of the CUDA sources (csrc/cuda) with nvcc, for machines without a GPU: a
# broken kernel or wrapper fails here even where nothing can run it. Compiles every .cu file for
# sm_80 and sm_90 against the installed torch's headers, like setup.py would, into a temporary
# directory. Skips (exit 0) when no nvcc is found. Usage: bash scripts/check_cuda.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: no nvcc found; CUDA sources not compiled"
  exit 0
fi
PY=.venv/bin/python
[[ -x "$PY" ]] || PY=python3
mapfile -t INC < <("$PY" - <<'PYEOF'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print(f"-I{p}")
PYEOF
)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# A CPU build of torch ships the c10/cuda headers but not the one CMake generates for them.
if ! ls "${INC[0]#-I}/c10/cuda/impl/cuda_cmake_macros.h" >/dev/null 2>&1; then
  mkdir -p "$OUT/inc/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$OUT/inc/c10/cuda/impl/cuda_cmake_macros.h"
  INC+=("-I$OUT/inc")
fi
ARCH=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
FLAGS=(-std=c++20 -O1 --use_fast_math -Xcompiler -fPIC -DTORCH_EXTENSION_NAME=_C_cuda
       -DTORCH_API_INCLUDE_EXTENSION_H --expt-relaxed-constexpr -Werror all-warnings)
pids=()
for src in csrc/cuda/*.cu; do
  "$NVCC" "${FLAGS[@]}" "${ARCH[@]}" "${INC[@]}" -c "$src" -o "$OUT/$(basename "$src").o" &
  pids+=($!)
done
# The module file is plain C++ (g++ builds it in setup.py): a syntax check against the same headers.
"${CXX:-g++}" -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_C_cuda "${INC[@]}" csrc/cuda/*.cpp &
pids+=($!)
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
# The kernel source must stay free of system headers outside the nvcc-only block (NVRTC compiles
# it, its own qm_*.cuh includes inlined by qmerge/ops/_cupy.py).
if grep -n '^#include <' csrc/cuda/kernels.cuh csrc/cuda/qm_*.cuh | grep -v cstdio; then
  echo "check_cuda: the kernel source (kernels.cuh, qm_*.cuh) must not include system headers (the CuPy fallback compiles it with NVRTC)"
  fail=1
fi
# The text the CuPy fallback hands to NVRTC is self-contained and compiles as one file.
"$PY" -c "from qmerge.ops._cupy import source_text; print(source_text())" > "$OUT/nvrtc_source.cu"
if grep -n '#include "' "$OUT/nvrtc_source.cu"; then echo "check_cuda: local include left in the NVRTC source"; fail=1; fi
"$NVCC" -std=c++17 -O1 -gencode arch=compute_90,code=sm_90 -c "$OUT/nvrtc_source.cu" -o "$OUT/nvrtc_source.o" || fail=1
if [[ $fail -ne 0 ]]; then
  echo "check_cuda: FAILED"
  exit 1
fi
echo "check_cuda: $(ls csrc/cuda/*.cu csrc/cuda/*.cpp | wc -l) CUDA extension sources compile for sm_80 and sm_90 ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
