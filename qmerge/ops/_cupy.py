"""The CUDA kernels without the compiled extension: CuPy compiles csrc/cuda/kernels.cuh with
NVRTC at first use (_cupy_runtime.py), and these wrappers launch them on torch's current
stream. They mirror the C++ wrappers of csrc/cuda/*.cu (same checks, same choice of path);
`register()` installs them as the ops' CUDA kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from qmerge.ops import _checks
from qmerge.ops._cupy_runtime import (  # noqa: F401  (source_text: scripts/check_cuda.sh)
    _DEQUANT_CHUNKS,
    _DEQUANT_THREADS,
    _GEMV_ROWS,
    _GEMV_WARPS,
    _MAX_GRID_Y,
    _MMA_MIN_ROWS,
    _MMA_WARPS,
    _SHRINK_COLS,
    _SUFFIX,
    _arr,
    _base_gemm_f32,
    _launch,
    _on_torch_stream,
    _routes,
    _same_device,
    _vec,
    kernel_source,
    source_text,
)

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
        f"qm_dequant_{_SUFFIX[base.dtype]}",
        grid,
        _DEQUANT_THREADS,
        (
            _arr(base),
            _arr(packed),
            _arr(ascales),
            np.int32(scales.shape[1]),
            np.int32(groups),
            np.int64(-(-inn // groups)),
            np.int32(tasks),
            _arr(out),
            np.int64(rows),
            np.int64(inn),
            _vec(inn, base, out),
        ),
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
    _same_device(
        op,
        x,
        base_w=base_w,
        packed=packed,
        scales=scales,
        task_ids=task_ids,
        coeffs=coeffs,
        bias=bias,
    )
    y = x.new_empty((rows, out))
    if rows == 0 or out == 0:
        return y
    scales32 = scales.float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    groups = scales.shape[2]
    gs = -(-inn // groups)
    ids, ids64, c32 = _routes(task_ids, coeffs)
    sign = (
        _arr(packed),
        _arr(scales32),
        np.int32(scales.shape[1]),
        np.int32(groups),
        np.int64(gs),
        np.int32(tasks),
    )
    mma = (
        rows >= _MMA_MIN_ROWS
        and x.dtype != torch.float32
        and (groups == 1 or gs % 16 == 0)
        and _has_mma(x)
    )
    if mma:
        _sign_mma(x, base_w, packed, sign, ids, ids64, c32, bias32, y)
    else:
        _sign_gemv(x, base_w, sign, ids, ids64, c32, bias32, y)
    return y


def _sign_mma(x, base_w, packed, sign, ids, ids64, c32, bias32, y) -> None:
    """Rows >= 3 in half precision: one fp32 base GEMM, then the sign terms on tensor cores."""
    rows, inn = x.shape
    out = base_w.shape[0]
    suffix = _SUFFIX[x.dtype]
    xa = x.clone() if x.data_ptr() % 4 else x
    y32 = _base_gemm_f32(xa, base_w)
    order = (
        torch.argsort(ids, stable=True) if ids is not None else torch.arange(rows, device=x.device)
    ).to(torch.int32)
    tiles = -(-out // 16)
    grid = (-(-rows // 8), -(-tiles // _MMA_WARPS))
    args = (
        _arr(xa),
        *sign,
        _arr(ids),
        ids64,
        _arr(order),
        _arr(c32),
        _arr(y32),
        np.int32(rows),
        np.int64(out),
        np.int64(inn),
        np.int32(packed.data_ptr() % 16 == 0),
    )
    _launch(f"qm_sign_mma_{suffix}", grid, _MMA_WARPS * 32, args)
    finish = (_arr(y32), _arr(bias32), _arr(y), np.int64(rows), np.int64(out))
    _launch(f"qm_finish_{suffix}", (-(-(rows * out) // 256),), 256, finish)


def _sign_gemv(x, base_w, sign, ids, ids64, c32, bias32, y) -> None:
    """Up to 8 rows a launch: the fused GEMV over the base weight and the bits."""
    rows, inn = x.shape
    out = base_w.shape[0]
    suffix = _SUFFIX[x.dtype]
    grid = (min(-(-out // _GEMV_WARPS), 1 << 20),)
    for n0 in range(0, rows, _GEMV_ROWS):
        n = min(_GEMV_ROWS, rows - n0)
        nr = 1 if n == 1 else 2 if n == 2 else 4 if n <= 4 else 8
        xs, ys = x[n0 : n0 + n], y[n0 : n0 + n]
        args = (
            _arr(xs),
            _arr(base_w),
            *sign,
            _arr(None if ids is None else ids[n0 : n0 + n]),
            ids64,
            _arr(None if c32 is None else c32[n0 : n0 + n]),
            _arr(bias32),
            _arr(ys),
            np.int32(n),
            np.int64(out),
            np.int64(inn),
            _vec(inn, xs, base_w),
        )
        _launch(f"qm_sign_gemv{nr}_{suffix}", grid, _GEMV_WARPS * 32, args)


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
            _launch(
                f"qm_lowrank_shrink_{suffix}",
                (n, slots, -(-inn // _SHRINK_COLS)),
                256,
                (
                    _arr(xs),
                    _arr(V),
                    np.int32(tasks),
                    np.int32(full_rank),
                    np.int32(r),
                    _arr(ids_s),
                    ids64,
                    _arr(c_s),
                    _arr(z[n0 : n0 + n]),
                    np.int64(inn),
                    _vec(inn, xs, V),
                ),
            )
        _launch(
            f"qm_lowrank_expand_{suffix}",
            (-(-out // 256), n),
            256,
            (
                _arr(y32[n0 : n0 + n]),
                _arr(U),
                np.int32(tasks),
                np.int32(full_rank),
                np.int32(r),
                np.int32(slots),
                _arr(ids_s),
                ids64,
                _arr(c_s),
                _arr(z[n0 : n0 + n]),
                _arr(bias32),
                _arr(y[n0 : n0 + n]),
                np.int64(out),
            ),
        )
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
