"""Linear merge, a weighted average of models (Wortsman et al. 2022, "Model soups",
arXiv:2203.05482): W = Σ_i w_i W_i / Σ_i w_i over the fine-tunes W_t = W0 + τ_t and, with
`base_weight`, the base itself. As a delta: shared = Σ_t w_t τ_t / (Σ_t w_t + base_weight)
(without `normalize`, the weighted sum of the models, which needs the base's weights).

With the base at hand (`TensorCtx.base`, as the direct merge gives it) the merged weight is
also given as mergekit computes it, a running sum of w_i · W_i in model order (the base
first), so the two tools' weights agree to the bit where W0 + τ_t gives back W_t."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, register
from qmerge.merge.gta import numbers, per_task


@dataclass(frozen=True)
class LinearConfig:
    """Attributes:
    weights: per task weights, '/'-separated (default 1 each).
    base_weight: the base's own weight among the averaged models (default 0).
    normalize: divide by the summed weights (default true: an average).
    """

    weights: str = ""
    base_weight: float = 0.0
    normalize: bool = True

    def __post_init__(self):
        numbers(self.weights, "LinearConfig.weights")
        numbers(repr(float(self.base_weight)), "LinearConfig.base_weight")


@register("linear", LinearConfig, "weighted average of the models (model soup)", "arXiv:2203.05482")
def linear(deltas: Tensor, cfg: LinearConfig, ctx: TensorCtx) -> Merged:
    T = deltas.shape[0]
    w = torch.tensor([cfg.base_weight, *per_task(cfg.weights, T, 1.0, "weights")])
    total = w.sum()
    if ctx.base is None:
        if not cfg.normalize:
            raise ConfigError("linear without normalize sums whole models: it needs the base")
        return Merged(sum(deltas[t] * (w[t + 1] / total) for t in range(T)))
    w0 = ctx.base.float()
    out = torch.zeros_like(w0)
    ones = (1,) * w0.dim()
    for i in range(T + 1):
        out.addcmul_(w0 if i == 0 else w0 + deltas[i - 1], w[i].reshape(ones))
    if cfg.normalize:
        out.div_(total)
    return Merged(out - w0, weight=out)
