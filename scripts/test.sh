#!/usr/bin/env bash
# Runs the test suite twice: with the compiled kernels (every instruction set this CPU has),
# and with them disabled (the pure-torch reference path). Installs first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q tests "$@"
QMERGE_DISABLE_EXT=1 .venv/bin/python -m pytest -q tests "$@"
