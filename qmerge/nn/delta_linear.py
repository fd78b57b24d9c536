"""DeltaLinear: a base linear layer plus every task's residual of its weight and bias.

    y[n] = base(x[n]) + sum_t c[n, t] * (x[n] tau_t^T + beta_t)

with c the row's route (context.py). The base is an `nn.Linear` (run fused with the residuals
by the qmerge ops, or replaced by a cached merged weight) or any layer that maps x to
x W0^T + b0, e.g. a bitsandbytes 8-bit / 4-bit linear: then the base runs as it is and the
residuals are added delta-only (the quantized weight is never dequantized by qmerge).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qmerge.nn import context, rows
from qmerge.nn.bank import WeightBank
from qmerge.nn.runtime import Runtime


class DeltaLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        weight: WeightBank | None,
        bias: Tensor | None,
        runtime: Runtime,
        name: str,
    ):
        super().__init__()
        self.base = base
        self.bank = weight
        self.bias_deltas = bias  # [T, out] or None
        self.runtime = runtime
        self.name = name
        self.plain = type(base) is nn.Linear
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)

    @property
    def weight(self) -> Tensor:  # for code that inspects the layer (dtype, device, shape)
        return self.base.weight

    def extra_repr(self) -> str:
        banks = ", ".join(type(b).__name__ for b in self.bank.banks) if self.bank else "none"
        return f"{self.name}: banks=[{banks}], bias_deltas={self.bias_deltas is not None}"

    def _bias(self, c: Tensor) -> Tensor | None:
        """b0 + sum_t c[t] beta_t for one coefficient vector."""
        b0 = self.base.bias
        if self.bias_deltas is None:
            return b0
        d = (c.to(self.bias_deltas.device) @ self.bias_deltas.float()).to(self.bias_deltas.dtype)
        return d if b0 is None else b0 + d

    def merged_weight(self, c: Tensor) -> Tensor:
        """W0 + sum_t c[t] tau_t, through the cache (key: this layer and the coefficients)."""
        key = (id(self), tuple(round(float(v), 7) for v in c))
        w0 = self.base.weight
        if not self.bank:
            return w0
        return self.runtime.cache.get(key, lambda: self.bank.merged(w0.detach(), c))

    def forward(self, x: Tensor) -> Tensor:
        route = context.active()
        if route is None or route.is_base():
            return self.base(x)
        uniform = route.uniform()
        lead, n_in = x.shape[:-1], x.shape[-1]
        n = x.numel() // max(n_in, 1)
        if uniform is not None and self.plain and self.runtime.materialize(n):
            return F.linear(x, self.merged_weight(uniform), self._bias(uniform))
        ids, coeffs = rows.for_rows(route, x)
        x2 = x.reshape(-1, n_in).contiguous()
        if self.plain:
            w0, b0 = self.base.weight, self.base.bias
            y = (
                self.bank.fused(x2, w0, b0, ids, coeffs, memo=route.memo)
                if self.bank
                else F.linear(x2, w0, b0)
            )
        else:
            y = self.base(x2)
            if self.bank:
                y = self.bank.fused(x2, None, None, ids, coeffs, base_out=y, memo=route.memo)
        if self.bias_deltas is not None:
            c, per = rows.per_sequence(route, x)
            y = rows.add_per_sequence(y, c, per, self.bias_deltas)
        return y.reshape(*lead, y.shape[-1])
