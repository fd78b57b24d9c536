"""What every router is: feature vectors [B, D] in, a Route over the pack's tasks out.

A router scores its tasks (`scores`, [B, T_router]); `mode` turns scores into a route:
  top1     each sequence goes to its best task (task ids; the fused path reads one task);
  softmax  each sequence gets softmax(scores / temperature) as coefficients (a soft merge).
A router may know fewer tasks than the pack (one added after it was fitted): those are never
chosen. Saved form: `config()` (JSON) + `tensors()` (safetensors), see store.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.registry import Registry
from qmerge.routing.route import Route

MODES = ("top1", "softmax")
ROUTERS: Registry[type[Router]] = Registry("router kind")


def register(summary: str, paper: str = ""):
    """Class decorator: registers a Router subclass under its `kind`."""

    def deco(cls: type[Router]) -> type[Router]:
        ROUTERS.register(cls.kind, cls, summary, paper)
        return cls

    return deco


class Router:
    kind: ClassVar[str] = ""
    # keyword options of `fit` beyond (features, layer, mode, temperature)
    fit_options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, tasks: Sequence[str], layer: int, mode: str = "top1", temperature: float = 1.0
    ):
        if mode not in MODES:
            raise ConfigError(f"router mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ConfigError(f"router temperature must be a positive number, got {temperature!r}")
        if not tasks:
            raise ConfigError("a router needs at least one task")
        self.tasks, self.layer = list(tasks), int(layer)
        self.mode, self.temperature = mode, float(temperature)

    @classmethod
    def fit(
        cls,
        features: Mapping[str, Tensor],
        layer: int,
        mode: str = "top1",
        temperature: float | None = None,
        **options: Any,
    ) -> Router:
        """A router fitted on example features per task (task -> [n_t, D])."""
        raise NotImplementedError

    def scores(self, feats: Tensor) -> Tensor:
        raise NotImplementedError

    def probabilities(self, feats: Tensor) -> Tensor:
        """softmax(scores / temperature), [B, T_router]."""
        return torch.softmax(self.scores(feats.float()) / self.temperature, dim=-1)

    def predict(self, feats: Tensor) -> list[str]:
        """The best task of each row, by name."""
        return [self.tasks[i] for i in self.scores(feats.float()).argmax(-1).tolist()]

    def route(self, feats: Tensor, tasks: Sequence[str]) -> Route:
        """The route over `tasks` (the pack's order) for these feature rows."""
        index = torch.tensor([tasks.index(t) if t in tasks else -1 for t in self.tasks])
        if bool((index < 0).all()):
            raise ConfigError(f"the router knows none of the pack's tasks ({', '.join(tasks)})")
        scores = self.scores(feats.float())
        scores[:, index < 0] = -math.inf
        if self.mode == "top1":
            return Route(tuple(tasks), task_ids=index[scores.argmax(-1)].contiguous())
        p = torch.softmax(scores / self.temperature, dim=-1)
        c = torch.zeros(feats.shape[0], len(tasks))
        keep = index >= 0
        c[:, index[keep]] = p[:, keep]
        return Route(tuple(tasks), coeffs=c)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tasks": self.tasks,
            "layer": self.layer,
            "mode": self.mode,
            "temperature": self.temperature,
        }

    def tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Router:
        raise NotImplementedError


def need(tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    """A stored router tensor, checked: float, finite and of this shape."""
    t = tensors.get(name)
    if t is None:
        raise ConfigError(f"router tensor '{name}' is missing")
    if tuple(t.shape) != shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise ConfigError(
            f"router tensor '{name}' must be finite float of shape {list(shape)}, "
            f"got {t.dtype} {list(t.shape)}"
        )
    return t.float()
