"""Build qmerge: the Python package plus its compiled kernels.

The CPU extension (`qmerge._C`) is always built. The CUDA extension (`qmerge._C_cuda`) is built
only when the installed torch has CUDA and an nvcc of the same major version is found, and only
once `csrc/cuda/` holds kernel sources. Environment switches:

  QMERGE_NO_EXT=1        pure-Python install: no compiled code (every op runs its reference)
  QMERGE_CUDA=auto|1|0   CUDA extension: auto-detect (default), force on (fails loudly if it
                         cannot be built), or off
  QMERGE_DEBUG=1         -O0 -g instead of -O3
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0")

Build against the torch already installed: `pip install --no-build-isolation -e .`.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

from setuptools import setup


def _env_flag(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in {"auto", "0", "1"}:
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _nvcc_major(cuda_home: str | None) -> int | None:
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _cuda_reason_not_built(torch, cuda_home: str | None) -> str | None:
    """Why the CUDA extension cannot be built here, or None when it can."""
    if torch.version.cuda is None:
        return "the installed torch is a CPU build"
    nvcc = _nvcc_major(cuda_home)
    if nvcc is None:
        return "no nvcc found (set CUDA_HOME)"
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc != torch_major:
        return f"nvcc is CUDA {nvcc} but torch was built for CUDA {torch.version.cuda}"
    if not glob.glob("csrc/cuda/*.cu"):
        return "csrc/cuda/ holds no kernel sources yet"
    return None


def extensions():
    if os.environ.get("QMERGE_NO_EXT") == "1":
        print("qmerge: QMERGE_NO_EXT=1, installing without compiled kernels")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("QMERGE_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -march=native: each ISA translation unit sets its own target with a pragma and the
    # instruction set is chosen at run time (csrc/cpu/isa.cpp).
    cxx = [*opt, "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    ext = [
        CppExtension(
            "qmerge._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc/cpu")],
            # Headers hold most kernel code: list them so editing one triggers a rebuild.
            depends=sorted(
                glob.glob("csrc/cpu/**/*.h", recursive=True) + glob.glob("csrc/common/*.h")
            ),
            extra_compile_args={"cxx": cxx},
            # Links libgomp by soname; at run time it resolves to the copy torch already loaded.
            extra_link_args=["-fopenmp"],
        )
    ]

    want_cuda = _env_flag("QMERGE_CUDA", "auto")
    if want_cuda != "0":
        reason = _cuda_reason_not_built(torch, CUDA_HOME)
        if reason is None:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            ext.append(
                CUDAExtension(
                    "qmerge._C_cuda",
                    sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                    depends=sorted(
                        glob.glob("csrc/cuda/*.h")
                        + glob.glob("csrc/cuda/*.cuh")
                        + glob.glob("csrc/common/*.h")
                    ),
                    extra_compile_args={"cxx": opt, "nvcc": [*opt, "--use_fast_math"]},
                )
            )
        elif want_cuda == "1":
            raise SystemExit(f"QMERGE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        else:
            print(f"qmerge: not building the CUDA extension: {reason}")
    return ext, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
