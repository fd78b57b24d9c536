"""The CUDA kernels without the compiled extension: CuPy compiles csrc/cuda/kernels.cuh with
NVRTC at first use, and these wrappers launch them on torch's current stream with the tensors
passed zero-copy through DLPack. They mirror the C++ wrappers of csrc/cuda/*.cu (same checks,
same choice of path); `register()` installs them as the ops' CUDA kernels.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qmerge.ops import _checks

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


# --- dequant_add_sign -----------------------------------------------------------------------


def _dequant_into(base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor, out: Tensor):
    op = "dequant_add_sign"
    _checks.matrix(base, op, "base")
    rows, inn = base.shape
    _checks.sign_set(op, packed, scales, rows, inn)
    tasks = packed.shape[0]
    _checks.alphas(op, alphas, tasks)
    _checks.out_like(op, out, base)
    if rows == 0 or inn == 0:
        return
    ascales = (scales.float() * alphas.float().view(-1, 1, 1)).contiguous()
    groups = scales.shape[2]
    nb = (inn + 7) // 8
    grid = (-(-nb // (_DEQUANT_THREADS * _DEQUANT_CHUNKS)), min(rows, _MAX_GRID_Y))
    _launch(
        f"qm_dequant_{_SUFFIX[base.dtype]}", grid, _DEQUANT_THREADS,
        (_arr(base), _arr(packed), _arr(ascales), np.int32(scales.shape[1]), np.int32(groups),
         np.int64(-(-inn // groups)), np.int32(tasks), _arr(out), np.int64(rows), np.int64(inn),
         _vec(inn, base, out)),
    )


@_on_torch_stream
def dequant_add_sign(base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor) -> Tensor:
    _checks.float_dtype(base, "dequant_add_sign", "base")
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    _dequant_into(base, packed, scales, alphas, out)
    return out


@_on_torch_stream
def dequant_add_sign_out(
    base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor, out: Tensor
) -> None:
    _dequant_into(base, packed, scales, alphas, out)


# --- sign_linear ----------------------------------------------------------------------------


def _has_mma(x: Tensor) -> bool:
    return torch.cuda.get_device_capability(x.device)[0] >= 8


@_on_torch_stream
def sign_linear(
    x: Tensor,
    base_w: Tensor,
    packed: Tensor,
    scales: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    op = "sign_linear"
    rows, inn, out = _checks.linear_inputs(op, x, base_w)
    _checks.sign_set(op, packed, scales, out, inn)
    tasks = packed.shape[0]
    _checks.routes(op, rows, tasks, task_ids, coeffs, check_values=False)
    _checks.bias(op, bias, out)
    _same_device(op, x, base_w=base_w, packed=packed, scales=scales, task_ids=task_ids,
                 coeffs=coeffs, bias=bias)
    y = x.new_empty((rows, out))
    if rows == 0 or out == 0:
        return y
    scales32 = scales.float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    groups = scales.shape[2]
    gs = -(-inn // groups)
    ids, ids64, c32 = _routes(task_ids, coeffs)
    sign = (_arr(packed), _arr(scales32), np.int32(scales.shape[1]), np.int32(groups),
            np.int64(gs), np.int32(tasks))
    mma = (rows >= _MMA_MIN_ROWS and x.dtype != torch.float32 and (groups == 1 or gs % 16 == 0)
           and _has_mma(x))
    suffix = _SUFFIX[x.dtype]
    if mma:
        xa = x.clone() if x.data_ptr() % 4 else x
        y32 = _base_gemm_f32(xa, base_w)
        order = (torch.argsort(ids, stable=True) if ids is not None
                 else torch.arange(rows, device=x.device)).to(torch.int32)
        tiles = -(-out // 16)
        grid = (-(-rows // 8), -(-tiles // _MMA_WARPS))
        _launch(f"qm_sign_mma_{suffix}", grid, _MMA_WARPS * 32,
                (_arr(xa), *sign, _arr(ids), ids64, _arr(order), _arr(c32), _arr(y32),
                 np.int32(rows), np.int64(out), np.int64(inn),
                 np.int32(packed.data_ptr() % 16 == 0)))
        _launch(f"qm_finish_{suffix}", (-(-(rows * out) // 256),), 256,
                (_arr(y32), _arr(bias32), _arr(y), np.int64(rows), np.int64(out)))
        return y
    grid = (min(-(-out // _GEMV_WARPS), 1 << 20),)
    for n0 in range(0, rows, _GEMV_ROWS):
        n = min(_GEMV_ROWS, rows - n0)
        nr = 1 if n == 1 else 2 if n == 2 else 4 if n <= 4 else 8
        xs, ys = x[n0 : n0 + n], y[n0 : n0 + n]
        _launch(f"qm_sign_gemv{nr}_{suffix}", grid, _GEMV_WARPS * 32,
                (_arr(xs), _arr(base_w), *sign,
                 _arr(None if ids is None else ids[n0 : n0 + n]), ids64,
                 _arr(None if c32 is None else c32[n0 : n0 + n]), _arr(bias32), _arr(ys),
                 np.int32(n), np.int64(out), np.int64(inn), _vec(inn, xs, base_w)))
    return y


# --- lowrank_linear -------------------------------------------------------------------------


@_on_torch_stream
def lowrank_linear(
    x: Tensor,
    base_w: Tensor,
    U: Tensor,
    V: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
    rank: int | None = None,
) -> Tensor:
    op = "lowrank_linear"
    rows, inn, out = _checks.linear_inputs(op, x, base_w)
    r = _checks.lowrank(op, x, U, V, out, rank)
    tasks, full_rank = U.shape[0], U.shape[2]
    _checks.routes(op, rows, tasks, task_ids, coeffs, check_values=False)
    _checks.bias(op, bias, out)
    _same_device(op, x, base_w=base_w, U=U, V=V, task_ids=task_ids, coeffs=coeffs, bias=bias)
    y = x.new_empty((rows, out))
    if rows == 0 or out == 0:
        return y
    ids, ids64, c32 = _routes(task_ids, coeffs)
    bias32 = None if bias is None else bias.float().contiguous()
    y32 = _base_gemm_f32(x, base_w)
    slots = 1 if ids is not None else tasks
    z = torch.zeros((rows, slots, max(r, 1)), device=x.device, dtype=torch.float32)
    suffix = _SUFFIX[x.dtype]
    for n0 in range(0, rows, _MAX_GRID_Y):
        n = min(_MAX_GRID_Y, rows - n0)
        xs = x[n0 : n0 + n]
        ids_s = None if ids is None else ids[n0 : n0 + n]
        c_s = None if c32 is None else c32[n0 : n0 + n]
        if r > 0:
            _launch(f"qm_lowrank_shrink_{suffix}", (n, slots, -(-inn // _SHRINK_COLS)), 256,
                    (_arr(xs), _arr(V), np.int32(tasks), np.int32(full_rank), np.int32(r),
                     _arr(ids_s), ids64, _arr(c_s), _arr(z[n0 : n0 + n]), np.int64(inn),
                     _vec(inn, xs, V)))
        _launch(f"qm_lowrank_expand_{suffix}", (-(-out // 256), n), 256,
                (_arr(y32[n0 : n0 + n]), _arr(U), np.int32(tasks), np.int32(full_rank),
                 np.int32(r), np.int32(slots), _arr(ids_s), ids64, _arr(c_s),
                 _arr(z[n0 : n0 + n]), _arr(bias32), _arr(y[n0 : n0 + n]), np.int64(out)))
    return y


def register(lib: torch.library.Library) -> None:
    """Install these wrappers as the CUDA kernels of the qmerge ops."""
    for name, fn in (
        ("dequant_add_sign", dequant_add_sign),
        ("dequant_add_sign_out", dequant_add_sign_out),
        ("sign_linear", sign_linear),
        ("lowrank_linear", lowrank_linear),
    ):
        lib.impl(name, fn, "CUDA")


def available() -> str | None:
    """None when the fallback can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"CuPy is not importable ({e})"
    try:
        kernel_source()
    except RuntimeError as e:
        return str(e)
    return None
