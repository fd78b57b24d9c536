"""DARE (Yu et al. 2024, "Language models are super Mario", arXiv:2311.03099): drop each entry
of each task vector with probability p and rescale the rest by 1/(1-p), then combine the
tasks with task arithmetic or TIES. The random drop is seeded per tensor from the merge's
seed and the tensor's name, so a merge is reproducible and independent of tensor order."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qmerge.codecs.base import check_choice
from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register
from qmerge.merge.ties import disjoint_mean


@dataclass(frozen=True)
class DareConfig:
    """Attributes:
    drop: p, the probability an entry is dropped (default 0.9).
    combine: "task_arithmetic" (default: λ Σ) or "ties" (elect signs, disjoint mean, λ).
    scale: λ (default 0.3).
    seed: the drop's seed (recorded in the pack's merge recipe).
    """

    drop: float = 0.9
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scale: float = 0.3
    seed: int = 0

    def __post_init__(self):
        check_fraction("DareConfig", "drop", self.drop, hi_open=True)
        check_choice("DareConfig", "combine", self.combine, ("task_arithmetic", "ties"))
        if not math.isfinite(self.scale):
            raise ConfigError(f"DareConfig.scale must be finite; got {self.scale}")


def generator(seed: int, name: str, task: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{task}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def drop_and_rescale(deltas: Tensor, p: float, seed: int, name: str) -> Tensor:
    out = torch.empty_like(deltas)
    for t in range(deltas.shape[0]):
        keep = torch.rand(deltas[t].shape, generator=generator(seed, name, t)) >= p
        out[t] = torch.where(keep, deltas[t] / (1 - p), 0.0)
    return out


@register(
    "dare", DareConfig, "random drop p + rescale, then task arithmetic or TIES", "arXiv:2311.03099"
)
def dare(deltas: Tensor, cfg: DareConfig, ctx: TensorCtx) -> Merged:
    d = drop_and_rescale(deltas, cfg.drop, cfg.seed, ctx.name)
    merged = d.sum(0) if cfg.combine == "task_arithmetic" else disjoint_mean(d)
    return Merged(merged.mul_(cfg.scale))
