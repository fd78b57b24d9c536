"""Loading the compiled kernels, and reporting which kernels run.

Importing qmerge never needs the extension: without it (not built, or QMERGE_DISABLE_EXT=1)
every op runs its pure-torch reference, and one warning says so.

CUDA tensors are served by, in order of preference (QMERGE_CUDA_BACKEND=auto, the default):
the compiled kernels of qmerge._C_cuda ("native"), the same kernel source compiled by CuPy at
first use ("cupy", qmerge/ops/_cupy.py), or the pure-torch reference. QMERGE_CUDA_BACKEND=native,
cupy or reference asks for one; QMERGE_DISABLE_EXT=1 means the reference on every device.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

_cpu: ModuleType | None = None
_why_not: str | None = None
_cuda_backend = "reference"
_cuda_why: str | None = None
_cuda_lib: torch.library.Library | None = None
CUDA_BACKENDS = ("auto", "native", "cupy", "reference")

BUILD_HINT = "build them with: pip install --no-build-isolation -e ."


def load() -> None:
    """Import qmerge._C (which registers the CPU kernels) unless disabled; warn once if absent."""
    global _cpu, _why_not
    if os.environ.get("QMERGE_DISABLE_EXT") == "1":
        _why_not = "disabled by QMERGE_DISABLE_EXT=1"
    else:
        try:
            _cpu = importlib.import_module("qmerge._C")
        except ImportError as e:
            _why_not = f"not importable ({e}); {BUILD_HINT}"
    if _cpu is None:
        warnings.warn(
            f"qmerge: compiled kernels {_why_not}; every op runs its pure-torch reference (slow)",
            RuntimeWarning,
            stacklevel=3,
        )
    _load_cuda()


def _load_cuda() -> None:
    """Pick the kernels for CUDA tensors (see the module docstring)."""
    global _cuda_backend, _cuda_why, _cuda_lib
    choice = os.environ.get("QMERGE_CUDA_BACKEND", "auto").strip().lower()
    if choice not in CUDA_BACKENDS:
        raise ValueError(
            f"qmerge: QMERGE_CUDA_BACKEND must be one of {', '.join(CUDA_BACKENDS)}, got {choice!r}"
        )
    if os.environ.get("QMERGE_DISABLE_EXT") == "1":
        _cuda_why = "disabled by QMERGE_DISABLE_EXT=1"
        return
    if choice == "reference" or torch.version.cuda is None:
        _cuda_why = "CPU build of torch" if choice != "reference" else "QMERGE_CUDA_BACKEND"
        return
    if choice in ("auto", "native"):
        try:
            importlib.import_module("qmerge._C_cuda")
            _cuda_backend = "native"
            return
        except ImportError as e:
            _cuda_why = f"qmerge._C_cuda not importable ({e})"
    if choice in ("auto", "cupy"):
        from qmerge.ops import _cupy

        reason = _cupy.available()
        if reason is None:
            _cuda_lib = torch.library.Library("qmerge", "IMPL")  # noqa: TOR901 - kept alive
            _cupy.register(_cuda_lib)
            _cuda_backend = "cupy"
            return
        _cuda_why = f"{_cuda_why}; CuPy fallback: {reason}" if _cuda_why else reason
    if choice != "auto":
        warnings.warn(
            f"qmerge: QMERGE_CUDA_BACKEND={choice} is not available ({_cuda_why}); CUDA tensors "
            "run the pure-torch reference",
            RuntimeWarning,
            stacklevel=4,
        )


def native_available() -> bool:
    """True when the compiled CPU kernels are registered."""
    return _cpu is not None


def backend() -> dict[str, str]:
    """Which kernels serve each device type.

    Returns:
        {"cpu": "native-<isa>" (see supported_isas) | "reference",
         "cuda": "native" | "cupy" | "reference"}, plus "reason" when the CPU kernels are
        missing and "cuda_reason" when the compiled CUDA kernels are not the ones in use.
    """
    out = {"cpu": f"native-{_cpu.active_isa()}" if _cpu else "reference", "cuda": _cuda_backend}
    if _why_not:
        out["reason"] = _why_not
    if _cuda_backend != "native" and _cuda_why:
        out["cuda_reason"] = _cuda_why
    return out


def _native(what: str) -> ModuleType:
    if _cpu is None:
        raise RuntimeError(f"qmerge: {what} needs the compiled kernels, which are {_why_not}")
    return _cpu


def set_isa(name: str) -> None:
    """Force the CPU kernels' instruction set: "avx512bf16", "avx512", "avx2", "scalar" or "auto".

    Also settable with the environment variable QMERGE_ISA before the first op call. Raises
    ValueError for an instruction set this CPU does not support.
    """
    _native("set_isa").set_isa(name)


def active_isa() -> str:
    """The instruction set the CPU kernels use now."""
    return _native("active_isa").active_isa()


def supported_isas() -> list[str]:
    """Instruction sets this CPU supports, best first (empty without the extension)."""
    return list(_cpu.supported_isas()) if _cpu else []
