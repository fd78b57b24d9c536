"""EMR-Merging (Huang et al. 2024, "EMR-Merging: tuning-free high-performance model merging",
arXiv:2405.17461): elect a unified task vector (per entry the sign of the sum and the largest
magnitude among the tasks that agree with it), then give each task a 1-bit mask (where its own
vector agrees in sign with the unified one) and one rescaler that restores its mean magnitude:

    τ_uni = σ ⊙ ε,   M_t = (τ_t ⊙ τ_uni > 0),   λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|,
    task t's model:  W0 + λ_t · M_t ⊙ τ_uni.

The shared delta is τ_uni; each task's part is a `mask` residual (codecs/mask.py). The
rescaler is per tensor here (the paper's is per model), which costs 4 bytes a tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qmerge.codecs.mask import MaskResidual
from qmerge.merge.base import Merged, TensorCtx, register


@dataclass(frozen=True)
class EmrConfig:
    """EMR has no options (it is tuning-free)."""


def unified(deltas: Tensor) -> Tensor:
    sign = torch.sign(deltas.sum(0))
    agree = deltas * sign > 0
    return sign * torch.where(agree, deltas.abs(), 0.0).amax(0)


@register(
    "emr",
    EmrConfig,
    "unified vector + per-task 1-bit masks and rescalers",
    "EMR-Merging, arXiv:2405.17461",
    static=False,
)
def emr(deltas: Tensor, cfg: EmrConfig, ctx: TensorCtx) -> Merged:
    uni = unified(deltas)
    masks: list = []
    for d in deltas:
        keep = d * uni > 0
        kept = float(torch.where(keep, uni.abs(), 0.0).sum(dtype=torch.float64))
        scale = float(d.abs().sum(dtype=torch.float64)) / kept if kept > 0 else 0.0
        masks.append(MaskResidual.from_mask(keep, scale, uni))
    return Merged(uni, masks)
