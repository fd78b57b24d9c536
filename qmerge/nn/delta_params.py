"""DeltaParams: any other module whose own parameters have task residuals (LayerNorm, RMSNorm,
...), run with per-row parameters.

Rows with the same coefficients form a group; each group runs the module once with its
merged parameters (torch.func.functional_call), so the module's own forward code is used as
it is. The parameters of such modules are vectors: merging them is cheap.

`nn.LayerNorm` and `nn.RMSNorm` over the last dimension take a faster way for mixed batches:
normalize every row once without the affine part, then apply each row's own weight (and bias),
gathered per sequence. So do other modules whose only residual is a `weight` vector that scales
the output (Llama's, Qwen's, SmolLM's own RMSNorm classes): a probe on first use checks that the
output is the weight times the output at weight 1 (Gemma's `1 + weight` fails it and keeps the
grouped way).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from qmerge.nn import context, rows


class DeltaParams(nn.Module):
    def __init__(self, base: nn.Module, deltas: dict[str, Tensor], name: str):
        super().__init__()
        self.base, self.name = base, name
        self.deltas = deltas  # param name -> [T, *shape], the param's dtype

    def extra_repr(self) -> str:
        return f"{self.name}: params={sorted(self.deltas)}"

    def _params(self, c: Tensor) -> dict[str, Tensor]:
        out = {}
        for n, d in self.deltas.items():
            p = getattr(self.base, n)
            out[n] = p + torch.tensordot(c.to(d.device, torch.float32), d.float(), 1).to(p.dtype)
        return out

    def forward(self, x: Tensor, *args, **kwargs):
        route = context.active()
        if route is None or route.is_base():
            return self.base(x, *args, **kwargs)
        uniform = route.uniform()
        if uniform is not None:
            return functional_call(self.base, self._params(uniform), (x, *args), kwargs)
        if self._affine_norm() and not args and not kwargs:
            return self._norm_rows(x, route)
        if not args and not kwargs and self._weight_scaled(x):
            return self._scaled_rows(x, route)
        flat = x.reshape(-1, x.shape[-1]) if route.per_token else x
        ids, coeffs = rows.for_rows(route, flat.reshape(flat.shape[0], -1))
        c = rows.dense(ids, coeffs, len(route.tasks))
        groups, inverse = torch.unique(c, dim=0, return_inverse=True)
        out = None
        for g in range(groups.shape[0]):
            idx = (inverse == g).nonzero().flatten().to(x.device)
            y = functional_call(self.base, self._params(groups[g]), (flat[idx], *args), kwargs)
            if out is None:
                out = y.new_empty((flat.shape[0], *y.shape[1:]))
            out[idx] = y
        assert out is not None
        return out.reshape(*x.shape[:-1], out.shape[-1]) if route.per_token else out

    def _affine_norm(self) -> bool:
        m = self.base
        return (
            type(m) in (nn.LayerNorm, nn.RMSNorm)
            and len(m.normalized_shape) == 1
            and m.weight is not None
        )

    def _weight_scaled(self, x: Tensor) -> bool:
        """Whether base(x) == weight * base(x; weight=1) for a weight vector over the last
        dimension, probed once on a small random input (exact in fp32 up to rounding)."""
        if getattr(self, "_scaled", None) is None:
            self._scaled = False
            w = getattr(self.base, "weight", None)
            if set(self.deltas) == {"weight"} and w is not None and w.dim() == 1:
                g = torch.Generator().manual_seed(0)
                probe = torch.randn(3, w.shape[0], generator=g).to(w.device, w.dtype)
                u = (torch.rand(w.shape[0], generator=g) + 0.5).to(w.device, w.dtype)
                try:
                    a = functional_call(self.base, {"weight": u}, (probe,))
                    b = functional_call(self.base, {"weight": torch.ones_like(w)}, (probe,))
                    self._scaled = a.shape == probe.shape and bool(
                        torch.allclose(a.float(), (b * u).float(), rtol=1e-2, atol=1e-5)
                    )
                except Exception:  # a module that rejects the probe keeps the grouped way
                    self._scaled = False
        return self._scaled and x.shape[-1] == self.base.weight.shape[0]

    def _unit(self) -> nn.Module:
        """A copy of the base module with weight 1, kept outside the module tree (not a
        parameter of the model) and remade if the base moves to another device or dtype:
        calling it directly costs a third of a functional_call (SmolLM2's norms: 30 against
        80 us, 61 norms per forward)."""
        w = self.base.weight
        unit = getattr(self, "_unit_copy", (None,))[0]
        if unit is None or unit.weight.device != w.device or unit.weight.dtype != w.dtype:
            unit = copy.deepcopy(self.base).requires_grad_(False)
            with torch.no_grad():
                unit.weight.fill_(1.0)
            self._unit_copy = (unit,)  # a tuple: nn.Module does not register it
        return unit

    def _scaled_rows(self, x: Tensor, route) -> Tensor:
        m = self.base
        c, per = rows.per_sequence(route, x)
        y = self._unit()(x)
        v = m.weight.expand(c.shape[0], -1)
        v = v + (c.to(m.weight.device, torch.float32) @ self.deltas["weight"].float()).to(v.dtype)
        return (y.reshape(c.shape[0], per, -1) * v[:, None, :]).reshape(x.shape)

    def _norm_rows(self, x: Tensor, route) -> Tensor:
        m = self.base
        c, per = rows.per_sequence(route, x)
        if type(m) is nn.LayerNorm:
            y = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        else:
            y = F.rms_norm(x, m.normalized_shape, None, m.eps)
        y = y.reshape(c.shape[0], per, -1)
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if p is None:
                continue
            v = p.expand(c.shape[0], -1)
            if name in self.deltas:
                v = v + (c.to(p.device, torch.float32) @ self.deltas[name].float()).to(p.dtype)
            y = y * v[:, None, :] if name == "weight" else y + v[:, None, :]
        return y.reshape(x.shape)
