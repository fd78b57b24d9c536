"""From a per-sequence (or per-token) Route to the rows of one layer's input.

x's first dimension is the batch (or the batch times the beams of a search); the rows of one
sequence are contiguous. Every layer of a forward pass asks the same questions, so the
answers are memoized on the route (one route per call and thread).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.routing.route import Route


def _shape(x: Tensor) -> tuple[int, int]:
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() > 1 else 1
    lead = x.shape[0] if x.dim() > 1 else 1
    return rows, lead


def per_sequence(route: Route, x: Tensor) -> tuple[Tensor, int]:
    """(coefficients [L, T], rows per entry): L sequences of `per` contiguous rows each (per
    token: L = rows, per = 1)."""
    rows, lead = _shape(x)
    if route.per_token:
        assert route.coeffs is not None
        c = route.coeffs.reshape(-1, len(route.tasks))
        if c.shape[0] != rows:
            raise ConfigError(
                f"per-token routing gave {c.shape[0]} token rows but a layer got "
                f"{rows}: per-token routing is for one full forward pass (route "
                f"per sequence when decoding with a KV cache)"
            )
        return c, 1
    return route.expand(lead).dense(), rows // lead


def for_rows(route: Route, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(task_ids [n], None) or (None, coeffs [n, T]) for the n rows of x."""
    rows, lead = _shape(x)
    return route.memo(("rows", rows, lead), lambda: _for_rows(route, x, rows, lead))


def _for_rows(route: Route, x: Tensor, rows: int, lead: int):
    if route.per_token:
        return None, per_sequence(route, x)[0]
    r = route.expand(lead)
    per = rows // lead
    if r.task_ids is not None:
        return (r.task_ids if per == 1 else r.task_ids.repeat_interleave(per)), None
    assert r.coeffs is not None
    return None, (r.coeffs if per == 1 else r.coeffs.repeat_interleave(per, 0))


def dense(task_ids: Tensor | None, coeffs: Tensor | None, tasks: int) -> Tensor:
    """[n, T] coefficients (one-hot of task ids; base rows all zero)."""
    if coeffs is not None:
        return coeffs
    assert task_ids is not None
    c = torch.zeros(task_ids.shape[0], tasks)
    hit = (task_ids >= 0).nonzero().flatten()
    c[hit, task_ids[hit]] = 1.0
    return c


def add_per_sequence(y: Tensor, c: Tensor, per: int, table: Tensor) -> Tensor:
    """y [L*per, D] += (c [L, T] @ table [T, D]) broadcast over each entry's rows, in place."""
    d = (c.to(table.device, torch.float32) @ table.float()).to(y.dtype)
    y.view(c.shape[0], per, -1).add_(d[:, None, :])
    return y
