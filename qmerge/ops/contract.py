"""The op contract: every `torch.ops.qmerge.*` schema, its fake (shape-only) kernel, the
pure-torch reference registered as its default kernel, and the typed Python entry points.

Schemas are public API (shared/DESIGN.md "Ops"). Native kernels (csrc/cpu, csrc/cuda) register
for their dispatch key on top of the default and must match these semantics; the tests compare
them with qmerge.ops.reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmerge.ops import _checks, reference

SCHEMAS: dict[str, str] = {
    "pack_signs": "(Tensor delta) -> Tensor",
    "unpack_signs": "(Tensor packed, int in_features, ScalarType? dtype=None) -> Tensor",
    "dequant_add_sign": "(Tensor base, Tensor packed, Tensor scales, Tensor alphas) -> Tensor",
    "dequant_add_sign_out": (
        "(Tensor base, Tensor packed, Tensor scales, Tensor alphas, Tensor(a!) out) -> ()"
    ),
    "sign_linear": (
        "(Tensor x, Tensor base_w, Tensor packed, Tensor scales, Tensor? task_ids=None, "
        "Tensor? coeffs=None, Tensor? bias=None) -> Tensor"
    ),
    "lowrank_linear": (
        "(Tensor x, Tensor base_w, Tensor U, Tensor V, Tensor? task_ids=None, "
        "Tensor? coeffs=None, Tensor? bias=None, int? rank=None) -> Tensor"
    ),
}

_lib = torch.library.Library("qmerge", "DEF")  # noqa: TOR901 - kept alive for the process
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
    torch.library.impl(f"qmerge::{_name}", "default", getattr(reference, _name), lib=_lib)


# --- fake kernels: shapes and dtypes only, no data-dependent checks -------------------------


@torch.library.register_fake("qmerge::pack_signs", lib=_lib)
def _pack_signs_fake(delta: Tensor) -> Tensor:
    _checks.float_dtype(delta, "pack_signs", "delta")
    return delta.new_empty((*delta.shape[:-1], (delta.shape[-1] + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("qmerge::unpack_signs", lib=_lib)
def _unpack_signs_fake(
    packed: Tensor, in_features: int, dtype: torch.dtype | None = None
) -> Tensor:
    if packed.shape[-1] != (in_features + 7) // 8:
        raise ValueError(
            f"qmerge.unpack_signs: 'packed' last dim must be {(in_features + 7) // 8}, got "
            f"{packed.shape[-1]}"
        )
    return packed.new_empty((*packed.shape[:-1], in_features), dtype=dtype or torch.float32)


@torch.library.register_fake("qmerge::dequant_add_sign", lib=_lib)
def _dequant_add_sign_fake(base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor) -> Tensor:
    _checks.matrix(base, "dequant_add_sign", "base")
    _checks.sign_set("dequant_add_sign", packed, scales, base.shape[0], base.shape[1])
    return torch.empty_like(base)


@torch.library.register_fake("qmerge::dequant_add_sign_out", lib=_lib)
def _dequant_add_sign_out_fake(
    base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor, out: Tensor
) -> None:
    _checks.matrix(base, "dequant_add_sign", "base")
    _checks.sign_set("dequant_add_sign", packed, scales, base.shape[0], base.shape[1])


@torch.library.register_fake("qmerge::sign_linear", lib=_lib)
def _sign_linear_fake(
    x: Tensor,
    base_w: Tensor,
    packed: Tensor,
    scales: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    rows, in_features, out = _checks.linear_inputs("sign_linear", x, base_w)
    _checks.sign_set("sign_linear", packed, scales, out, in_features)
    _checks.routes("sign_linear", rows, packed.shape[0], task_ids, coeffs, check_values=False)
    return x.new_empty((rows, out))


@torch.library.register_fake("qmerge::lowrank_linear", lib=_lib)
def _lowrank_linear_fake(
    x: Tensor,
    base_w: Tensor,
    U: Tensor,
    V: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
    rank: int | None = None,
) -> Tensor:
    rows, _, out = _checks.linear_inputs("lowrank_linear", x, base_w)
    _checks.lowrank("lowrank_linear", x, U, V, out, rank)
    _checks.routes("lowrank_linear", rows, U.shape[0], task_ids, coeffs, check_values=False)
    return x.new_empty((rows, out))


# --- typed entry points ----------------------------------------------------------------------


def pack_signs(delta: Tensor) -> Tensor:
    """Pack the signs of a delta, 8 columns per byte, least significant bit first.

    Args:
        delta: (..., in_features) float32/float16/bfloat16, contiguous.

    Returns:
        packed: (..., ceil(in_features / 8)) uint8.

    Semantics: bit j of byte b is ``delta[..., 8b + j] >= 0``; padding bits are 0.
    """
    return torch.ops.qmerge.pack_signs(delta)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype | None = None) -> Tensor:
    """Expand packed signs to +-1.

    Args:
        packed: (..., ceil(in_features / 8)) uint8.
        in_features: number of columns to produce.
        dtype: output dtype (float32 by default; float16, bfloat16).

    Returns:
        (..., in_features) of +1 where the bit is set, -1 where it is not.
    """
    return torch.ops.qmerge.unpack_signs(packed, in_features, dtype)


def dequant_add_sign(
    base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor, out: Tensor | None = None
) -> Tensor:
    """Rebuild a merged weight from the base and T 1-bit task vectors.

    Args:
        base: (out_features, in_features) float, contiguous.
        packed: (T, out_features, ceil(in_features / 8)) uint8.
        scales: (T, R, G) float; R = 1 (per tensor) or out_features (per row); G groups along
            in_features, group g covering columns [g*gs, min(in, (g+1)*gs)), gs = ceil(in / G).
        alphas: (T,) float, the weight of each task.
        out: optional (out_features, in_features) buffer of base's dtype to write into (may be
            ``base`` itself for an in-place merge).

    Returns:
        W: (out_features, in_features), base's dtype (``out`` when given).

    Semantics: ``W = base + sum_t alphas[t] * scales[t] * (2 * bits[t] - 1)``, fp32 accumulation
    in task order, one rounding to base's dtype.
    """
    if out is None:
        return torch.ops.qmerge.dequant_add_sign(base, packed, scales, alphas)
    torch.ops.qmerge.dequant_add_sign_out(base, packed, scales, alphas, out)
    return out


def sign_linear(
    x: Tensor,
    base_w: Tensor,
    packed: Tensor,
    scales: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """A linear layer whose weight differs per row: the base plus that row's 1-bit task(s).

    Args:
        x: (N, in_features) float, contiguous.
        base_w: (out_features, in_features), x's dtype.
        packed, scales: the T tasks, as in :func:`dequant_add_sign`.
        task_ids: (N,) int64/int32, each row's task in [0, T), or -1 for the bare base.
        coeffs: (N, T) float, each row's mixture over tasks (instead of task_ids).
        bias: optional (out_features,) float.

    Returns:
        y: (N, out_features), x's dtype.

    Semantics: ``y[n] = x[n] W^T + sum_t c[n, t] * (x[n] (scale_t * sign_t)^T) + bias``, with c
    one-hot of task_ids or coeffs; fp32 accumulation. No weight is materialized for small N;
    for large N a task with many rows may be rebuilt once and run as a GEMM.
    """
    return torch.ops.qmerge.sign_linear(x, base_w, packed, scales, task_ids, coeffs, bias)


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
    """A linear layer plus per-row low-rank task residuals.

    Args:
        x: (N, in_features) float, contiguous.
        base_w: (out_features, in_features), x's dtype.
        U: (T, out_features, r), V: (T, r, in_features), x's dtype; task t's residual is U_t V_t.
        task_ids, coeffs, bias: as in :func:`sign_linear`.
        rank: use only the first ``rank`` components (0 <= rank <= r); all by default.

    Returns:
        y: (N, out_features), x's dtype.

    Semantics: ``y[n] = x[n] W^T + sum_t c[n, t] * (x[n] V_t^T) U_t^T + bias``; the rank-r
    intermediate is fp32.
    """
    return torch.ops.qmerge.lowrank_linear(x, base_w, U, V, task_ids, coeffs, bias, rank)
