"""The prototype router: no training, a few unlabeled example inputs per task.

Each example is a feature vector (e.g. the base model's mean-pooled hidden state at one
layer, qmerge/nn/features.py). Features are L2-normalised and centred on the mean of all
examples (so the direction every input shares does not dominate); a task's prototype is the
mean of its centred examples. Two ways to score an input against the prototypes (`metric`):

  cosine       the cosine to each normalised prototype: nearest-centroid / prototypical-network
               classification, as in the routers of Twin-Merging and weight-ensembling MoE.
  mahalanobis  (default) the distance to each prototype under the examples' covariance around
               their own task's prototype, shared by the tasks and shrunk towards a multiple of
               the identity by the Ledoit-Wolf estimate of the best weight (Ledoit & Wolf
               2004; so few examples still give a usable inverse); score_t = x.S^-1 mu_t -
               mu_t.S^-1 mu_t / 2, the log-likelihood of a Gaussian per task with one shared
               covariance (Fisher's linear discriminant). Still closed form, no training: it
               discounts the directions along which examples of one task already vary, which
               is where cosine confuses tasks with similar inputs (WordNet noun vs verb glosses,
               bench/results/quality.md).

Saved form: `center` [D] and `centroids` [T, D] (the normalised prototypes for cosine; S^-1 mu_t
for mahalanobis) plus, for mahalanobis, `bias` [T] (-mu_t.S^-1 mu_t / 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.routing.router import Router, need, register

METRICS = ("mahalanobis", "cosine")
# softmax temperatures that suit each metric's scores: cosines lie in [-1, 1]; the
# mahalanobis scores are log-likelihoods already.
TEMPERATURES = {"cosine": 0.05, "mahalanobis": 1.0}


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


@register(
    "distance to each task's mean base feature (Mahalanobis or cosine); no "
    "training, a few unlabeled examples per task"
)
class PrototypeRouter(Router):
    kind = "prototype"
    fit_options = ("metric", "shrinkage")

    def __init__(
        self,
        tasks,
        layer: int,
        centroids: Tensor,
        center: Tensor,
        mode: str = "top1",
        temperature: float = 0.05,
        metric: str = "cosine",
        bias: Tensor | None = None,
        shrinkage: float | None = None,
    ):
        super().__init__(tasks, layer, mode, temperature)
        _check_metric(metric)
        if (bias is None) != (metric == "cosine"):
            raise ConfigError(
                f"prototype router: the {metric} metric "
                f"{'needs' if bias is None else 'takes no'} bias tensor"
            )
        self.centroids, self.center = centroids.float(), center.float()
        self.metric, self.shrinkage = metric, shrinkage
        self.bias = None if bias is None else bias.float()

    @classmethod
    def fit(
        cls,
        features: Mapping[str, Tensor],
        layer: int,
        mode: str = "top1",
        temperature: float | None = None,
        metric: str = "mahalanobis",
        shrinkage: float | None = None,
    ) -> PrototypeRouter:
        """features: task -> [n_t, D] example features (n_t >= 1). shrinkage in [0, 1]: the
        weight of the identity in the shared covariance (mahalanobis only; default: the
        Ledoit-Wolf estimate)."""
        for t, f in features.items():
            if f.dim() != 2 or f.shape[0] < 1:
                raise ConfigError(
                    f"prototype router: task {t!r} needs at least one example "
                    f"feature row, got shape {list(f.shape)}"
                )
        _check_metric(metric)
        if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
            raise ConfigError(f"prototype router shrinkage must be in [0, 1], got {shrinkage!r}")
        temperature = temperature or TEMPERATURES[metric]
        units = {t: _unit(f) for t, f in features.items()}
        center = torch.cat(list(units.values())).mean(0)
        centred = [u - center for u in units.values()]
        if metric == "cosine":
            cents = torch.stack([_unit(x.mean(0)) for x in centred])
            return cls(list(features), layer, cents, center, mode, temperature)
        weight, bias, shrinkage = _discriminant(centred, shrinkage)
        return cls(
            list(features), layer, weight, center, mode, temperature, metric, bias, shrinkage
        )

    def scores(self, feats: Tensor) -> Tensor:
        if self.metric == "cosine":
            return _unit(_unit(feats) - self.center) @ self.centroids.T
        return (_unit(feats) - self.center) @ self.centroids.T + self.bias

    def config(self) -> dict[str, Any]:
        out = super().config() | {"metric": self.metric}
        return out | ({"shrinkage": self.shrinkage} if self.shrinkage is not None else {})

    def tensors(self) -> dict[str, Tensor]:
        out = {"centroids": self.centroids.contiguous(), "center": self.center.contiguous()}
        return out | ({"bias": self.bias.contiguous()} if self.bias is not None else {})

    @classmethod
    def from_saved(
        cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]
    ) -> PrototypeRouter:
        c = tensors.get("centroids")
        dim = c.shape[-1] if c is not None and c.dim() == 2 else -1
        n = len(config["tasks"])
        metric = config.get("metric", "cosine")  # routers saved before metrics existed
        bias = need(tensors, "bias", (n,)) if metric == "mahalanobis" else None
        return cls(
            config["tasks"],
            config["layer"],
            need(tensors, "centroids", (n, dim)),
            need(tensors, "center", (dim,)),
            config["mode"],
            config["temperature"],
            metric,
            bias,
            config.get("shrinkage"),
        )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(
            f"prototype router metric must be one of {', '.join(METRICS)}, got {metric!r}"
        )


def _discriminant(centred: list[Tensor], shrinkage: float | None) -> tuple[Tensor, Tensor, float]:
    """Fisher's linear discriminant of the tasks' example rows: (S^-1 mu_t [T, D],
    -mu_t.S^-1 mu_t / 2 [T], the shrinkage used) with S the pooled covariance around each
    task's mean, shrunk to (1 - shrinkage) S + shrinkage * (trace(S) / D) I. Float64."""
    xs = [x.double() for x in centred]
    mu = torch.stack([x.mean(0) for x in xs])
    within = torch.cat([x - m for x, m in zip(xs, mu, strict=True)])
    dim = within.shape[1]
    cov = within.T @ within / within.shape[0]
    scale = float(cov.diagonal().mean())
    if scale <= 1e-12:  # one example per task (or identical ones): no spread to learn from
        cov, scale, shrinkage = torch.zeros_like(cov), 1.0, 1.0
    elif shrinkage is None:
        shrinkage = ledoit_wolf(within, cov)
    cov = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(dim, dtype=cov.dtype)
    weight = torch.linalg.solve(cov, mu.T).T
    bias = -0.5 * (weight * mu).sum(1)
    return weight.float(), bias.float(), float(shrinkage)


def ledoit_wolf(x: Tensor, cov: Tensor) -> float:
    """The Ledoit-Wolf weight of the identity for the covariance `cov` = x.T x / n of the
    centred rows x [n, D]: the estimate of the weight that minimises the expected Frobenius
    error of the shrunk matrix (Ledoit & Wolf 2004, "A well-conditioned estimator for
    large-dimensional covariance matrices", lemma 3.2-3.4)."""
    n, dim = x.shape
    mu = float(cov.diagonal().mean())
    # d^2: how far cov is from mu I; b^2: the variance of cov as an estimate, capped at d^2
    d2 = float(((cov - mu * torch.eye(dim, dtype=cov.dtype)) ** 2).sum()) / dim
    sq = x * x
    b2 = (float((sq.T @ sq).sum()) / n - float((cov * cov).sum())) / (n * dim)
    b2 = min(max(b2, 0.0), d2)
    return b2 / d2 if d2 > 0 else 1.0
