"""TaskHead: a linear layer that only fine-tunes have (a classifier), one per task.

Tasks may have different numbers of outputs (labels); the layer returns the widest, and a row
whose task has fewer fills the rest with the dtype's lowest value, so argmax and softmax
never pick them. A mixture row mixes the outputs of its tasks (they must have the same
width). A row routed to the bare base uses the model's own layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmerge.errors import ConfigError
from qmerge.nn import context, rows


class TaskHead(nn.Module):
    def __init__(self, base: nn.Module, heads: dict[int, tuple[Tensor, Tensor | None]], name: str):
        super().__init__()
        self.base, self.heads, self.name = base, heads, name
        self.out_features = max(w.shape[0] for w, _ in heads.values())

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def extra_repr(self) -> str:
        return f"{self.name}: tasks={sorted(self.heads)}, widest={self.out_features}"

    def _run(self, t: int, x: Tensor) -> Tensor:
        if t < 0:
            return self.base(x)
        if t not in self.heads:
            raise ConfigError(
                f"{self.name}: task #{t} has no head here (it was compressed "
                f"without --head for this layer)"
            )
        w, b = self.heads[t]
        return F.linear(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        route = context.active()
        if route is None or route.is_base():
            return self.base(x)
        ids, coeffs = rows.for_rows(route, x)
        x2 = x.reshape(-1, x.shape[-1])
        width = max(self.out_features, getattr(self.base, "out_features", 0) or 0)
        y = torch.full(
            (x2.shape[0], width), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device
        )
        if ids is not None:
            for t in ids.unique().tolist():
                idx = (ids == t).nonzero().flatten()
                out = self._run(t, x2[idx])
                y[idx, : out.shape[-1]] = out
        else:
            assert coeffs is not None
            for i in range(x2.shape[0]):
                used = coeffs[i].nonzero().flatten().tolist()
                if not used:
                    out = self._run(-1, x2[i : i + 1])[0]
                else:
                    parts = [float(coeffs[i, t]) * self._run(t, x2[i : i + 1])[0] for t in used]
                    if len({p.shape[0] for p in parts}) > 1:
                        raise ConfigError(
                            f"{self.name}: a mixture of tasks with different "
                            f"numbers of outputs cannot share a head"
                        )
                    out = sum(parts[1:], parts[0])
                y[i, : out.shape[0]] = out
        return y.reshape(*x.shape[:-1], width)
