"""DELLA-Merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", arXiv:2406.11617): MAGPRUNE drops each entry of a task
vector at random with a probability that falls with its magnitude rank (keep probability
from density − ε for the smallest to density + ε for the largest, per row), rescales the
survivors (to the vector's L1 norm, as mergekit does), elects signs and averages the agreeing
entries (`della`) or sums the weighted vectors (`della_linear`), then scales by λ. Both are
`gta` instances (gta.py); the draws are seeded from the merge's seed and the tensor's name."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register
from qmerge.merge.gta import GtaConfig, gta_merge, numbers


@dataclass(frozen=True)
class DellaConfig:
    """Attributes:
    density: the mean share of entries kept (default 0.7).
    epsilon: the spread of keep probabilities around it, by magnitude rank (default 0.15;
        density ± epsilon must lie in (0, 1)).
    weights: per task weights, '/'-separated (default 1 each).
    scale: λ (default 1.0).
    seed: the draws' seed (recorded in the pack's merge recipe).
    """

    density: float = 0.7
    epsilon: float = 0.15
    weights: str = ""
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_fraction("DellaConfig", "density", self.density, lo_open=True)
        if not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ConfigError(
                f"DellaConfig: density ± epsilon must lie in (0, 1); got {self.density} ± "
                f"{self.epsilon}"
            )
        numbers(self.weights, "DellaConfig.weights")
        if not math.isfinite(self.scale):
            raise ConfigError(f"DellaConfig.scale must be finite; got {self.scale}")

    def gta(self, ties: bool) -> GtaConfig:
        return GtaConfig(
            sparsify="magprune",
            consensus="sum" if ties else "none",
            density=self.density,
            epsilon=self.epsilon,
            weights=self.weights,
            normalize=ties,
            rescale=True,
            scale=self.scale,
            seed=self.seed,
        )


@register(
    "della",
    DellaConfig,
    "MAGPRUNE (drop by magnitude rank, rescale), elect signs, average the agreeing entries",
    "arXiv:2406.11617",
)
def della(deltas: Tensor, cfg: DellaConfig, ctx: TensorCtx) -> Merged:
    return Merged(gta_merge(deltas, cfg.gta(ties=True), ctx))


@register(
    "della_linear",
    DellaConfig,
    "MAGPRUNE, then the weighted sum of the task vectors",
    "arXiv:2406.11617",
)
def della_linear(deltas: Tensor, cfg: DellaConfig, ctx: TensorCtx) -> Merged:
    return Merged(gta_merge(deltas, cfg.gta(ties=False), ctx))
