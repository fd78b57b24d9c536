"""Loading the compiled kernels, and reporting which kernels run.

Importing qmerge never needs the extension: without it (not built, or QMERGE_DISABLE_EXT=1)
every op runs its pure-torch reference, and one warning says so.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_cpu: ModuleType | None = None
_why_not: str | None = None

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


def native_available() -> bool:
    """True when the compiled CPU kernels are registered."""
    return _cpu is not None


def backend() -> dict[str, str]:
    """Which kernels serve each device type.

    Returns:
        {"cpu": "native-<isa>" (see supported_isas) | "reference", "cuda": "reference"} (CUDA kernels come with csrc/cuda/; until then the reference runs
        on CUDA tensors), plus "reason" when the CPU kernels are missing.
    """
    out = {"cpu": f"native-{_cpu.active_isa()}" if _cpu else "reference", "cuda": "reference"}
    if _why_not:
        out["reason"] = _why_not
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
