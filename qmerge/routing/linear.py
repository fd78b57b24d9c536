"""The linear router: multinomial logistic regression on the same features as the prototype
router, fitted from labeled examples (feature rows with their task), full-batch L-BFGS with L2.
Features are standardised with the training mean and standard deviation, stored with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.routing.router import Router, need, register


@register("logistic regression on base features, fitted from labeled examples")
class LinearRouter(Router):
    kind = "linear"

    def __init__(
        self,
        tasks,
        layer: int,
        weight: Tensor,
        bias: Tensor,
        mean: Tensor,
        std: Tensor,
        mode: str = "top1",
        temperature: float = 1.0,
    ):
        super().__init__(tasks, layer, mode, temperature)
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std

    @classmethod
    def fit(
        cls,
        features: Mapping[str, Tensor],
        layer: int,
        mode: str = "top1",
        temperature: float | None = None,
        l2: float = 1e-3,
        steps: int = 200,
    ) -> LinearRouter:
        """features: task -> [n_t, D] labeled example features; temperature default 1.0."""
        temperature = 1.0 if temperature is None else temperature
        if len(features) < 2:
            raise ConfigError("a linear router needs examples of at least two tasks")
        x = torch.cat([f.float() for f in features.values()])
        y = torch.cat([torch.full((f.shape[0],), i) for i, f in enumerate(features.values())])
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - mean) / std
        g = torch.Generator().manual_seed(0)
        w = (0.01 * torch.randn(len(features), x.shape[1], generator=g)).requires_grad_()
        b = torch.zeros(len(features), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(list(features), layer, w.detach(), b.detach(), mean, std, mode, temperature)

    def scores(self, feats: Tensor) -> Tensor:
        return ((feats.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def tensors(self) -> dict[str, Tensor]:
        return {
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
            "mean": self.mean.contiguous(),
            "std": self.std.contiguous(),
        }

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> LinearRouter:
        w = tensors.get("weight")
        dim = w.shape[-1] if w is not None and w.dim() == 2 else -1
        n = len(config["tasks"])
        return cls(
            config["tasks"],
            config["layer"],
            need(tensors, "weight", (n, dim)),
            need(tensors, "bias", (n,)),
            need(tensors, "mean", (dim,)),
            need(tensors, "std", (dim,)),
            config["mode"],
            config["temperature"],
        )
