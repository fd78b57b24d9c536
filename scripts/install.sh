#!/usr/bin/env bash
# Installs qmerge into ./.venv: torch 2.13.0 (CPU build), the package with its compiled
# kernels (built against that torch: --no-build-isolation), and the test tools.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
pip install --upgrade pip "setuptools>=77" wheel
# A plain `torch` requirement would pull a multi-GB CUDA build: pin the CPU wheel.
pip install torch==2.13.0 "numpy>=1.24" "tqdm>=4.60" "pytest>=7" "hypothesis>=6" "safetensors>=0.4" ninja
# Linters that scripts/test.sh runs (pinned: a new release may flag or format differently).
pip install "ruff==0.17.6" "clang-format==23.1.5"
# Routed inference patches transformers models; the tests also load a bitsandbytes-quantized
# base (its CPU backend). --no-deps on bitsandbytes: its only other needs are torch and numpy.
pip install "transformers==5.23.0"
pip install --no-deps "bitsandbytes==0.50.2"
# Export formats: PEFT adapters, ONNX (torch's dynamo exporter needs onnxscript) and
# onnxruntime, which checks the ONNX export.
pip install "peft==0.21.2" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.31.1"
# The HTTP server (qmerge serve) and its tests: an HTTP client and the OpenAPI fuzzer.
pip install "fastapi==0.163.2" "uvicorn==0.54.0" "httpx==0.28.1" "schemathesis==4.32.5"
# The quality benchmark's plot (bench/quality/run.py; its smoke test runs in the suite).
pip install "matplotlib==3.11.2"
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation -e .
.venv/bin/python -c "from qmerge import ops; print('qmerge installed; kernels:', ops.backend())"
