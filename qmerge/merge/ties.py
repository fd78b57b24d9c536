"""TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim each task vector to its top-k %
entries by magnitude, elect a sign per entry (the sign of the summed trimmed values), and take
the disjoint mean of the entries that agree with it; shared = λ · that mean."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register


@dataclass(frozen=True)
class TiesConfig:
    """Attributes:
    density: the share of entries each task keeps after trimming (k; default 0.2).
    scale: λ applied to the disjoint mean (default 1.0, the paper's).
    """

    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self):
        check_fraction("TiesConfig", "density", self.density, lo_open=True)
        if not math.isfinite(self.scale):
            raise ConfigError(f"TiesConfig.scale must be finite; got {self.scale}")


def trim(deltas: Tensor, density: float) -> Tensor:
    """Each task's tensor with all but its top `density` share of magnitudes set to 0."""
    if density >= 1:
        return deltas.clone()
    flat = deltas.reshape(deltas.shape[0], -1)
    k = max(1, int(round(density * flat.shape[1])))
    # the k-th largest magnitude per task; ties at the threshold are all kept
    thresh = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    return torch.where(flat.abs() >= thresh, flat, 0.0).reshape(deltas.shape)


def disjoint_mean(deltas: Tensor) -> Tensor:
    """Mean over tasks of the entries whose sign agrees with the elected sign (sign of the
    sum; an entry with sum 0 gets 0)."""
    elected = torch.sign(deltas.sum(0))
    agree = (torch.sign(deltas) == elected) & (deltas != 0)
    n = agree.sum(0)
    return torch.where(agree, deltas, 0.0).sum(0) / n.clamp_min(1)


@register("ties", TiesConfig, "trim to top-k %, elect signs, disjoint mean", "arXiv:2306.01708")
def ties(deltas: Tensor, cfg: TiesConfig, ctx: TensorCtx) -> Merged:
    return Merged(disjoint_mean(trim(deltas, cfg.density)).mul_(cfg.scale))
