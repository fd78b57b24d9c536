"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522): the fine-tunes' average pulled back toward the base by the angle between
their task vectors. Per tensor (or per row, `filter_wise`), with cos θ the mean pairwise
cosine of the T task vectors:

    t = T cos θ / (1 + (T − 1) cos θ),   shared = t · mean_t τ_t

(norm products below 1e-6 count as 1e-6 and cosines are clamped to [−1, 1], as mergekit
computes them). It needs two tasks or more. Given the base (`TensorCtx.base`, as the direct
merge gives it), it also gives the merged weight mixed from full weights, t·mean(W_t) +
(1 − t)·W0, which is how mergekit rounds it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, register


@dataclass(frozen=True)
class ModelStockConfig:
    """Attributes:
    filter_wise: one angle per row (output filter) instead of one per tensor (default false).
    """

    filter_wise: bool = False


def _rows(deltas: Tensor, filter_wise: bool) -> Tensor:
    """[T, groups, n]: one group per row (filter-wise; a vector is one row), else one."""
    T = deltas.shape[0]
    if filter_wise and deltas.dim() > 2:
        return deltas.reshape(T, deltas.shape[1], -1)
    return deltas.reshape(T, 1, -1)


def stock_ratio(deltas: Tensor, filter_wise: bool) -> Tensor:
    """t per group of `_rows` ([groups, 1]) from the mean pairwise cosine."""
    flat = _rows(deltas, filter_wise)
    T = flat.shape[0]
    cosines = []
    for i in range(T):
        for j in range(i + 1, T):
            norms = flat[i].norm(dim=-1) * flat[j].norm(dim=-1)
            cos = (flat[i] * flat[j]).sum(-1) / norms.clamp(min=1e-6)
            cosines.append(cos.clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    return (T * cos) / (1 + (T - 1) * cos)


@register(
    "model_stock",
    ModelStockConfig,
    "the tasks' average, scaled by t = T cos θ / (1 + (T−1) cos θ) from their angle",
    "arXiv:2403.19522",
)
def model_stock(deltas: Tensor, cfg: ModelStockConfig, ctx: TensorCtx) -> Merged:
    if deltas.shape[0] < 2:
        raise ConfigError("model_stock needs at least two tasks (the angle between them)")
    t = stock_ratio(deltas, cfg.filter_wise)
    T = deltas.shape[0]
    if ctx.base is None:
        mean = deltas.mean(0)
        return Merged((t * _rows(mean[None], cfg.filter_wise)[0]).reshape(mean.shape))
    # with the base at hand, the merged weight as mergekit mixes it, t·mean(W) + (1 − t)·W0,
    # summing the full weights in task order; one task's weight at a time
    w0 = ctx.base.float()
    acc = w0 + deltas[0]
    for i in range(1, T):
        acc.add_(w0 + deltas[i])
    acc.div_(T)
    avg, base = _rows(acc[None], cfg.filter_wise)[0], _rows(w0[None], cfg.filter_wise)[0]
    avg.mul_(t).add_((1 - t) * base)  # avg is a view of acc: acc becomes the merged weight
    return Merged(acc - w0, weight=acc)
