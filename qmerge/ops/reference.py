"""Pure-torch reference of every qmerge op: the semantics, and the tests' oracle.

Registered as each op's default kernel (contract.py), so every op runs on any device without
the compiled extension: slowly, exactly. All arithmetic is fp32; outputs round once to the
activation dtype. Bit layout and shapes: shared/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from qmerge.ops import _checks

_BIT_WEIGHTS = [1 << j for j in range(8)]


def group_size(in_features: int, groups: int) -> int:
    """Columns per scale group: group g covers [g*gs, min(in, (g+1)*gs))."""
    return -(-in_features // groups) if in_features else 0


def expand_scales(scales: Tensor, out: int, in_features: int) -> Tensor:
    """scales [T, 1 or out, G] -> fp32 [T, out, in], each column its group's scale."""
    gs = group_size(in_features, scales.shape[2])
    cols = torch.arange(in_features, device=scales.device) // max(gs, 1)
    return scales.float()[:, :, cols].expand(scales.shape[0], out, in_features)


def pack_signs(delta: Tensor) -> Tensor:
    """Semantics: packed[..., b] = sum_j (delta[..., 8b + j] >= 0) << j; padding bits 0."""
    _checks.float_dtype(delta, "pack_signs", "delta")
    if delta.dim() < 1:
        raise ValueError("qmerge.pack_signs: 'delta' must have at least 1 dimension")
    _checks.contiguous(delta, "pack_signs", "delta")
    in_features = delta.shape[-1]
    nb = (in_features + 7) // 8
    bits = (delta >= 0).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, nb * 8 - in_features))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=delta.device)
    return (bits.view(*delta.shape[:-1], nb, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype | None = None) -> Tensor:
    """Semantics: out[..., c] = +1 if bit c of the row is set else -1."""
    op = "unpack_signs"
    if packed.dtype != torch.uint8:
        raise TypeError(f"qmerge.{op}: 'packed' must be uint8, got {packed.dtype}")
    if packed.dim() < 1:
        raise ValueError(f"qmerge.{op}: 'packed' must have at least 1 dimension")
    _checks.contiguous(packed, op, "packed")
    if in_features < 0:
        raise ValueError(f"qmerge.{op}: 'in_features' must be >= 0, got {in_features}")
    nb = (in_features + 7) // 8
    if packed.shape[-1] != nb:
        raise ValueError(
            f"qmerge.{op}: 'packed' last dim must be {nb} (ceil(in_features / 8) for "
            f"in_features = {in_features}), got {packed.shape[-1]}"
        )
    dtype = dtype or torch.float32
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"qmerge.{op}: 'dtype' must be float32, float16 or bfloat16, got {dtype}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], nb * 8)[..., :in_features]
    return (bits.to(dtype) * 2 - 1).contiguous()


def dequant_add_sign(base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor) -> Tensor:
    """Semantics: W = base + sum_t alphas[t] * scales[t] (expanded) * (2 * bits[t] - 1).

    fp32 accumulation in task order, rounded once to base.dtype.
    """
    op = "dequant_add_sign"
    _checks.matrix(base, op, "base")
    out, in_features = base.shape
    _checks.sign_set(op, packed, scales, out, in_features)
    _checks.alphas(op, alphas, packed.shape[0])
    signs = unpack_signs(packed, in_features)
    ascales = scales.float() * alphas.float().view(-1, 1, 1)
    steps = expand_scales(ascales, out, in_features)
    w = base.float()
    for t in range(packed.shape[0]):
        w = w + steps[t] * signs[t]
    return w.to(base.dtype)


def dequant_add_sign_out(
    base: Tensor, packed: Tensor, scales: Tensor, alphas: Tensor, out: Tensor
) -> None:
    """Semantics: out[...] = dequant_add_sign(base, packed, scales, alphas); out may be base."""
    op = "dequant_add_sign"
    _checks.matrix(base, op, "base")
    _checks.out_like(op, out, base)
    out.copy_(dequant_add_sign(base, packed, scales, alphas))


def sign_linear(
    x: Tensor,
    base_w: Tensor,
    packed: Tensor,
    scales: Tensor,
    task_ids: Tensor | None = None,
    coeffs: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Semantics: y[n] = x[n] W^T + sum_t c[n, t] * (x[n] (scale_t * sign_t)^T) + bias.

    c is one-hot of task_ids (task -1: no term) or the coeffs matrix; terms with c == 0 are
    skipped, so a row only ever reads the tasks it uses.
    """
    op = "sign_linear"
    rows, in_features, out = _checks.linear_inputs(op, x, base_w)
    _checks.sign_set(op, packed, scales, out, in_features)
    tasks = packed.shape[0]
    _checks.routes(op, rows, tasks, task_ids, coeffs)
    _checks.bias(op, bias, out)
    x32 = x.float()
    y = x32 @ base_w.float().T
    deltas = expand_scales(scales, out, in_features) * unpack_signs(packed, in_features)
    for t, idx, c in _terms(rows, tasks, task_ids, coeffs):
        y[idx] += c[:, None] * (x32[idx] @ deltas[t].T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


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
    """Semantics: y[n] = x[n] W^T + sum_t c[n, t] * (x[n] V_t[:r]^T) U_t[:, :r]^T + bias."""
    op = "lowrank_linear"
    rows, _, out = _checks.linear_inputs(op, x, base_w)
    r = _checks.lowrank(op, x, U, V, out, rank)
    _checks.routes(op, rows, U.shape[0], task_ids, coeffs)
    _checks.bias(op, bias, out)
    x32 = x.float()
    y = x32 @ base_w.float().T
    for t, idx, c in _terms(rows, U.shape[0], task_ids, coeffs):
        z = x32[idx] @ V[t, :r].float().T
        y[idx] += (c[:, None] * z) @ U[t, :, :r].float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _terms(
    rows: int, tasks: int, task_ids: Tensor | None, coeffs: Tensor | None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(task, rows that use it, their fp32 coefficients) for every task some row uses."""
    for t in range(tasks):
        if task_ids is not None:
            idx = (task_ids == t).nonzero().flatten()
            c = torch.ones(idx.numel(), device=task_ids.device)
        else:
            assert coeffs is not None
            idx = (coeffs[:, t] != 0).nonzero().flatten()
            c = coeffs[idx, t].float()
        if idx.numel():
            yield t, idx, c
