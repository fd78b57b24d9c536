"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks", arXiv:2312.06795): mask out each task vector's largest
magnitudes (outliers, the share γ) and its smallest, keeping the share `density`, then add
the weighted masked vectors (λ); `breadcrumbs_ties` elects signs first and averages the
agreeing entries, as TIES does. Both are `gta` instances (gta.py), as mergekit defines them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register
from qmerge.merge.gta import GtaConfig, gta_merge, numbers


@dataclass(frozen=True)
class BreadcrumbsConfig:
    """Attributes:
    density: the share of each task vector's entries kept (default 0.9).
    gamma: the share of its largest magnitudes dropped as outliers (default 0.01).
    weights: per task weights, '/'-separated (default 1 each).
    scale: λ, applied to the sum (default 1.0).
    """

    density: float = 0.9
    gamma: float = 0.01
    weights: str = ""
    scale: float = 1.0

    def __post_init__(self):
        check_fraction("BreadcrumbsConfig", "density", self.density, lo_open=True)
        check_fraction("BreadcrumbsConfig", "gamma", self.gamma)
        numbers(self.weights, "BreadcrumbsConfig.weights")
        if not math.isfinite(self.scale):
            raise ConfigError(f"BreadcrumbsConfig.scale must be finite; got {self.scale}")

    def gta(self, ties: bool) -> GtaConfig:
        return GtaConfig(
            sparsify="outliers",
            consensus="sum" if ties else "none",
            density=self.density,
            gamma=self.gamma,
            weights=self.weights,
            scale=self.scale,
        )


@register(
    "breadcrumbs",
    BreadcrumbsConfig,
    "drop each task vector's outliers and smallest entries, weighted sum",
    "arXiv:2312.06795",
)
def breadcrumbs(deltas: Tensor, cfg: BreadcrumbsConfig, ctx: TensorCtx) -> Merged:
    return Merged(gta_merge(deltas, cfg.gta(ties=False), ctx))


@register(
    "breadcrumbs_ties",
    BreadcrumbsConfig,
    "Breadcrumbs masks, then TIES's sign election over the weighted vectors",
    "arXiv:2312.06795",
)
def breadcrumbs_ties(deltas: Tensor, cfg: BreadcrumbsConfig, ctx: TensorCtx) -> Merged:
    return Merged(gta_merge(deltas, cfg.gta(ties=True), ctx))
