"""Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic",
arXiv:2212.04089): shared = λ Σ_t τ_t; no per-task part."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, register


@dataclass(frozen=True)
class TaskArithmeticConfig:
    """Attributes:
    scale: λ, the weight of every task vector in the sum (default 0.3, the paper's usual
        choice for several tasks; 1/T is the plain average).
    """

    scale: float = 0.3

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ConfigError(f"TaskArithmeticConfig.scale must be finite; got {self.scale}")


@register(
    "task_arithmetic",
    TaskArithmeticConfig,
    "λ · Σ task vectors",
    "arXiv:2212.04089",
    linear=lambda cfg: cfg.scale,
)
def task_arithmetic(deltas: Tensor, cfg: TaskArithmeticConfig, ctx: TensorCtx) -> Merged:
    return Merged(deltas.sum(0).mul_(cfg.scale))
