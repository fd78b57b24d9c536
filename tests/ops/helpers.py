"""Tolerance policy (shared/STYLE.md rule 16) and small input builders for the op tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qmerge import ops


def make_signs(tasks: int, out: int, inn: int, scale_rows: int | None = None, groups: int = 1):
    """Packed signs of random deltas and positive scales [T, R, G] (R = out by default)."""
    packed = ops.reference.pack_signs(torch.randn(tasks, out, inn))
    scales = torch.rand(tasks, scale_rows or out, groups) * 0.1 + 0.01
    return packed, scales


def assert_within_eager(y: Tensor, exact: Tensor, eager: Tensor, what: str = "") -> None:
    """A fused float kernel's error against the fp32 result may be at most ~2x that of eager
    torch at the same dtype (flash-attention's rule); a floor of 2 ulp of fp32 at the output's
    magnitude covers fp32, where eager torch can be exact by luck of summation order."""
    err = (y.float() - exact).abs().max().item()
    eager_err = (eager.float() - exact).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1.0) * 16
    assert err <= 2 * eager_err + floor, f"{what}: error {err:.3g} > 2 x eager {eager_err:.3g}"


def merged_weights(base: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """fp32 [T, out, in]: base + task delta, for building eager baselines."""
    out, inn = base.shape
    deltas = ops.reference.expand_scales(scales, out, inn) * ops.reference.unpack_signs(packed, inn)
    return base.float() + deltas


def route_coeffs(route: dict, rows: int, tasks: int) -> Tensor:
    """fp32 [rows, T]: the one-hot of task_ids (-1: no task) or the coeffs given."""
    if "task_ids" in route:
        ids = route["task_ids"]
        c = torch.zeros(rows, tasks)
        c[ids >= 0, ids[ids >= 0]] = 1.0
        return c
    return route["coeffs"].float()


def sign_eager(x, base, packed, scales, c, bias=None) -> Tensor:
    """What torch does at x's dtype: materialize each row's weight in that dtype, F.linear."""
    deltas = merged_weights(base, packed, scales) - base.float()
    w = base.float()[None] + torch.einsum("nt,toi->noi", c, deltas)
    y = torch.stack([F.linear(x[n : n + 1], w[n].to(x.dtype))[0] for n in range(x.shape[0])])
    return y if bias is None else y + bias.to(x.dtype)
