#!/usr/bin/env bash
# Lints (ruff, clang-format), compile-checks the CUDA kernels, then runs the test suite twice:
# with the compiled kernels (every instruction set this CPU has), and with them disabled (the
# pure-torch reference path). Installs first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint is a test (shared/STYLE.md, 26): a finding fails the run.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/clang-format --style=file --dry-run --Werror $(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
# The CUDA sources compile (sm_80, sm_90) even where no GPU can run them; skipped without nvcc.
bash scripts/check_cuda.sh
.venv/bin/python -m pytest -q tests "$@"
QMERGE_DISABLE_EXT=1 .venv/bin/python -m pytest -q tests "$@"
