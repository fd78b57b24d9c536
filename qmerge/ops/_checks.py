"""Argument checks shared by the fake kernels and the pure-torch reference.

They raise the same exception types with the same messages as csrc/cpu/checks.h
(`TORCH_CHECK_TYPE` -> TypeError, `TORCH_CHECK_VALUE` -> ValueError, `TORCH_CHECK_INDEX` ->
IndexError): every message names the op and the argument, the expected and the actual value.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_dtype(t: Tensor, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"qmerge.{op}: '{name}' must be float32, float16 or bfloat16, got {t.dtype}"
        )


def contiguous(t: Tensor, op: str, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"qmerge.{op}: '{name}' must be contiguous (got sizes {list(t.shape)}, strides "
            f"{list(t.stride())}); call .contiguous() first"
        )


def dim(t: Tensor, d: int, op: str, name: str) -> None:
    if t.dim() != d:
        raise ValueError(
            f"qmerge.{op}: '{name}' must have {d} dimensions, got shape {list(t.shape)}"
        )


def same_dtype(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"qmerge.{op}: '{name}' must have the dtype of '{ref_name}' ({ref.dtype}), "
            f"got {t.dtype}"
        )


def matrix(t: Tensor, op: str, name: str, like: Tensor | None = None) -> None:
    """A contiguous 2-D float tensor (of the dtype of `like`, when given)."""
    float_dtype(t, op, name)
    if like is not None:
        same_dtype(t, like, op, name, "x")
    dim(t, 2, op, name)
    contiguous(t, op, name)


def sign_set(op: str, packed: Tensor, scales: Tensor, out: int, in_features: int) -> None:
    """packed [T, out, ceil(in/8)] uint8; scales [T, 1 or out, 1..in] float."""
    nb = (in_features + 7) // 8
    if packed.dtype != torch.uint8:
        raise TypeError(f"qmerge.{op}: 'packed' must be uint8, got {packed.dtype}")
    dim(packed, 3, op, "packed")
    contiguous(packed, op, "packed")
    tasks = packed.shape[0]
    if packed.shape[1] != out or packed.shape[2] != nb:
        raise ValueError(
            f"qmerge.{op}: 'packed' must have shape [T, {out}, {nb}] (out_features, "
            f"ceil(in_features / 8)), got {list(packed.shape)}"
        )
    float_dtype(scales, op, "scales")
    dim(scales, 3, op, "scales")
    contiguous(scales, op, "scales")
    if scales.shape[0] != tasks:
        raise ValueError(
            f"qmerge.{op}: 'scales' must have {tasks} tasks (dim 0 of 'packed'), got shape "
            f"{list(scales.shape)}"
        )
    if scales.shape[1] not in (1, out):
        raise ValueError(
            f"qmerge.{op}: 'scales' dim 1 must be 1 (per tensor) or {out} (per row), got shape "
            f"{list(scales.shape)}"
        )
    if not 1 <= scales.shape[2] <= max(in_features, 1):
        raise ValueError(
            f"qmerge.{op}: 'scales' dim 2 (groups along in_features) must be in "
            f"[1, {in_features}], got shape {list(scales.shape)}"
        )


def routes(
    op: str,
    rows: int,
    tasks: int,
    task_ids: Tensor | None,
    coeffs: Tensor | None,
    check_values: bool = True,
) -> None:
    """Exactly one of task_ids [rows] (ints in [-1, tasks)) or coeffs [rows, tasks] (float)."""
    if (task_ids is None) == (coeffs is None):
        which = "neither" if task_ids is None else "both"
        raise ValueError(
            f"qmerge.{op}: pass exactly one of 'task_ids' (one task per row) or 'coeffs' "
            f"(a mixture per row), got {which}"
        )
    if task_ids is not None:
        if task_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"qmerge.{op}: 'task_ids' must be int64 or int32, got {task_ids.dtype}")
        dim(task_ids, 1, op, "task_ids")
        contiguous(task_ids, op, "task_ids")
        if task_ids.shape[0] != rows:
            raise ValueError(
                f"qmerge.{op}: 'task_ids' must have {rows} entries (rows of 'x'), got "
                f"{task_ids.shape[0]}"
            )
        if check_values:
            bad = ((task_ids < -1) | (task_ids >= tasks)).nonzero()
            if bad.numel():
                n = int(bad[0, 0])
                raise IndexError(
                    f"qmerge.{op}: 'task_ids'[{n}] = {int(task_ids[n])} is out of range: "
                    f"expected -1 (no task) or 0..{tasks - 1}"
                )
    else:
        assert coeffs is not None
        float_dtype(coeffs, op, "coeffs")
        dim(coeffs, 2, op, "coeffs")
        contiguous(coeffs, op, "coeffs")
        if tuple(coeffs.shape) != (rows, tasks):
            raise ValueError(
                f"qmerge.{op}: 'coeffs' must have shape [{rows}, {tasks}] (rows of 'x', tasks), "
                f"got {list(coeffs.shape)}"
            )


def bias(op: str, b: Tensor | None, out: int) -> None:
    if b is None:
        return
    float_dtype(b, op, "bias")
    if b.dim() != 1 or b.shape[0] != out:
        raise ValueError(f"qmerge.{op}: 'bias' must have shape [{out}], got {list(b.shape)}")


def linear_inputs(op: str, x: Tensor, base_w: Tensor) -> tuple[int, int, int]:
    """x [N, in] and base_w [out, in] of one dtype; returns (N, in, out)."""
    matrix(x, op, "x")
    matrix(base_w, op, "base_w", like=x)
    if base_w.shape[1] != x.shape[1]:
        raise ValueError(
            f"qmerge.{op}: 'base_w' must have {x.shape[1]} columns (in_features of 'x'), got "
            f"shape {list(base_w.shape)}"
        )
    return x.shape[0], x.shape[1], base_w.shape[0]


def lowrank(op: str, x: Tensor, U: Tensor, V: Tensor, out: int, rank: int | None) -> int:
    """U [T, out, r], V [T, r, in] of the dtype of x; returns the rank used."""
    for t, name in ((U, "U"), (V, "V")):
        same_dtype(t, x, op, name, "x")
        contiguous(t, op, name)
        dim(t, 3, op, name)
    tasks, full = U.shape[0], U.shape[2]
    if U.shape[1] != out:
        raise ValueError(f"qmerge.{op}: 'U' must have shape [T, {out}, r], got {list(U.shape)}")
    if tuple(V.shape) != (tasks, full, x.shape[1]):
        raise ValueError(
            f"qmerge.{op}: 'V' must have shape [{tasks}, {full}, {x.shape[1]}] to match 'U' "
            f"{list(U.shape)}, got {list(V.shape)}"
        )
    r = full if rank is None else rank
    if not 0 <= r <= full:
        raise ValueError(f"qmerge.{op}: 'rank' must be in [0, {full}] (the stored rank), got {r}")
    return r


def alphas(op: str, a: Tensor, tasks: int) -> None:
    """alphas [T] float: the weight of each task (dequant_add_sign)."""
    float_dtype(a, op, "alphas")
    dim(a, 1, op, "alphas")
    if a.shape[0] != tasks:
        raise ValueError(
            f"qmerge.{op}: 'alphas' must have {tasks} entries (one per task), got {a.shape[0]}"
        )


def out_like(op: str, out: Tensor, base: Tensor) -> None:
    """An output buffer of base's dtype and shape, contiguous (dequant_add_sign_out)."""
    same_dtype(out, base, op, "out", "base")
    contiguous(out, op, "out")
    if out.shape != base.shape:
        raise ValueError(
            f"qmerge.{op}: 'out' must have the shape of 'base' {list(base.shape)}, got "
            f"{list(out.shape)}"
        )
