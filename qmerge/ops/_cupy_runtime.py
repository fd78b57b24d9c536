"""The CuPy fallback's runtime: the kernel source handed to NVRTC (csrc/cuda, local includes
inlined), the compiled module, launches on torch's current stream with tensors passed
zero-copy through DLPack, and the small helpers the op wrappers in _cupy.py share. The launch
constants mirror the C++ wrappers of csrc/cuda/*.cu.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_SOURCE = "csrc/cuda/kernels.cuh"
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_GEMV_ROWS = 8
_GEMV_WARPS = 8
_MMA_MIN_ROWS = 3  # kMmaMinRows in csrc/cuda/sign_linear.cu
_MMA_WARPS = 4
_MAX_GRID_Y = 65535
_DEQUANT_THREADS = 128
_SHRINK_COLS = 2048  # kShrinkCols in kernels.cuh
_DEQUANT_CHUNKS = 4  # kDequantChunks in kernels.cuh


def kernel_source() -> Path:
    """The kernel source shipped with the repository (an editable install)."""
    root = Path(__file__).resolve().parents[2]
    if (root / _SOURCE).is_file():
        return root / _SOURCE
    raise RuntimeError(
        f"qmerge: the CuPy fallback needs the kernel source {_SOURCE} next to the "
        f"package (looked in {root}); install qmerge from its repository with pip install -e ."
    )


def source_text(path: Path | None = None, seen: set[Path] | None = None) -> str:
    """kernels.cuh with its local includes (`#include "qm_*.cuh"`) inlined, each once: one
    self-contained text for NVRTC, whatever include paths it is given."""
    path = path or kernel_source()
    seen = set() if seen is None else seen
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r'\s*#include "([^"]+)"', line)
        if m:
            dep = (path.parent / m.group(1)).resolve()
            if dep not in seen:
                seen.add(dep)
                out.append(source_text(dep, seen))
            continue
        if line.strip() != "#pragma once":  # one file now
            out.append(line)
    return "\n".join(out)


@functools.cache
def _module():
    import cupy

    return cupy.RawModule(code=source_text(), options=("-std=c++17",))


def _kernel(name: str):
    return _module().get_function(name)


def _arr(t: Tensor | None):
    """A CuPy view of a torch tensor (DLPack, no copy); 16-bit floats travel as int16."""
    import cupy

    if t is None:
        return np.uint64(0)  # a null pointer
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)


def _launch(name: str, grid: tuple[int, ...], block: int, args: tuple) -> None:
    _kernel(name)(grid, (block,), args)


def _cupy_stream(cupy, stream: torch.cuda.Stream):
    """torch's stream as a CuPy stream (CuPy 14 deprecates ExternalStream for from_external)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(stream)
        except (TypeError, AttributeError):  # a torch stream without the CUDA stream protocol
            pass
    return cupy.cuda.ExternalStream(stream.cuda_stream)


def _on_torch_stream(fn):
    """Runs an op with torch's current stream as CuPy's: DLPack exchanges and launches are
    ordered with the torch work around them, with no synchronization."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import cupy

        ref = args[0]
        if ref.device.type != "cuda":  # the checks name the misplaced argument
            return fn(*args, **kwargs)
        with torch.cuda.device(ref.device), cupy.cuda.Device(ref.device.index or 0):
            with _cupy_stream(cupy, torch.cuda.current_stream()):
                return fn(*args, **kwargs)

    return wrapper


def _aligned16(*ts: Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _vec(in_features: int, *ts: Tensor) -> np.int32:
    return np.int32(in_features % 8 == 0 and _aligned16(*ts))


def _same_device(op: str, ref: Tensor, **ts: Tensor | None) -> None:
    for name, t in ts.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"qmerge.{op}: '{name}' must be on the device of 'x' ({ref.device}), got {t.device}"
            )


def _routes(task_ids: Tensor | None, coeffs: Tensor | None):
    if task_ids is not None:
        return task_ids, np.int32(task_ids.dtype == torch.int64), None
    assert coeffs is not None
    return None, np.int32(0), coeffs.float().contiguous()


def _base_gemm_f32(x: Tensor, w: Tensor) -> Tensor:
    if x.dtype == torch.float32:
        return x @ w.T
    return torch.mm(x, w.T, out_dtype=torch.float32)
