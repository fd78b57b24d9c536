"""The prototype router: no training, a few unlabeled example inputs per task.

Each example is a feature vector (e.g. the base model's mean-pooled hidden state at one
layer, qmerge/nn/features.py). Features are L2-normalised and centred on the mean of all
examples (so the direction every input shares does not dominate the cosine); a task's
prototype is the normalised mean of its centred examples. An input scores the cosine to each
prototype (the idea of nearest-centroid / prototypical-network classification, and of the
routers in Twin-Merging and weight-ensembling MoE, without their training).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.routing.router import Router, need, register


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@register
class PrototypeRouter(Router):
    kind = "prototype"

    def __init__(self, tasks, layer: int, centroids: Tensor, center: Tensor, mode: str = "top1",
                 temperature: float = 0.05):
        super().__init__(tasks, layer, mode, temperature)
        self.centroids, self.center = centroids.float(), center.float()

    @classmethod
    def fit(cls, features: Mapping[str, Tensor], layer: int, mode: str = "top1",
            temperature: float = 0.05) -> PrototypeRouter:
        """features: task -> [n_t, D] example features (n_t >= 1)."""
        for t, f in features.items():
            if f.dim() != 2 or f.shape[0] < 1:
                raise ConfigError(f"prototype router: task {t!r} needs at least one example "
                                  f"feature row, got shape {list(f.shape)}")
        units = {t: _unit(f) for t, f in features.items()}
        center = torch.cat(list(units.values())).mean(0)
        cents = torch.stack([_unit((u - center).mean(0)) for u in units.values()])
        return cls(list(features), layer, cents, center, mode, temperature)

    def scores(self, feats: Tensor) -> Tensor:
        return _unit(_unit(feats) - self.center) @ self.centroids.T

    def tensors(self) -> dict[str, Tensor]:
        return {"centroids": self.centroids.contiguous(), "center": self.center.contiguous()}

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]
                   ) -> PrototypeRouter:
        c = tensors.get("centroids")
        dim = c.shape[-1] if c is not None and c.dim() == 2 else -1
        n = len(config["tasks"])
        return cls(config["tasks"], config["layer"], need(tensors, "centroids", (n, dim)),
                   need(tensors, "center", (dim,)), config["mode"], config["temperature"])
