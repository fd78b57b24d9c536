"""SLERP (spherical linear interpolation, Shoemake 1985, "Animating rotation with quaternion
curves", SIGGRAPH; for model weights as mergekit and others use it): per tensor, between two
endpoints v0 and v1 with θ the angle between them,

    slerp(t) = sin((1 − t) θ) / sin θ · v0 + sin(t θ) / sin θ · v1,

and plain linear interpolation when |cos θ| > 0.9995 (nearly parallel). The endpoints are
full weights, not task vectors: with two tasks, v0 = W0 + τ_0 and v1 = W0 + τ_1; with one
task, v0 = W0 (the base) and v1 = W0 + τ. The shared delta is slerp(t) − W0, so the method
needs the base (`--base`). Computed in fp32 with numpy, in the order mergekit computes it, so
the merged weights equal its own."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register

PARALLEL = 0.9995


@dataclass(frozen=True)
class SlerpConfig:
    """Attributes:
    t: the interpolation factor: 0 gives the first endpoint, 1 the second (default 0.5).
    """

    t: float = 0.5

    def __post_init__(self):
        if not math.isfinite(self.t):
            raise ConfigError(f"SlerpConfig.t must be finite; got {self.t}")
        check_fraction("SlerpConfig", "t", self.t)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1e-8 else v


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """The interpolation of the module docstring between two tensors (fp32)."""
    a, b = v0.detach().float().numpy(), v1.detach().float().numpy()
    dot = np.sum(_unit(a) * _unit(b))
    if np.abs(dot) > PARALLEL:
        out = (1 - t) * a + t * b
    else:
        theta = np.arccos(dot)
        s = np.sin(theta)
        out = np.sin(theta - theta * t) / s * a + np.sin(theta * t) / s * b
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


@register(
    "slerp",
    SlerpConfig,
    "spherical interpolation between two tasks' weights (or the base and one task) at t",
    "Shoemake 1985",
    needs_base=True,
)
def slerp_merge(deltas: Tensor, cfg: SlerpConfig, ctx: TensorCtx) -> Merged:
    if deltas.shape[0] not in (1, 2) or ctx.base is None:
        raise ConfigError(
            f"slerp interpolates between two endpoints: a pack of one or two tasks and the "
            f"base; got {deltas.shape[0]} tasks"
            + ("" if ctx.base is not None else " and no base (give --base)")
        )
    w0 = ctx.base.float()
    v0 = w0 if deltas.shape[0] == 1 else w0 + deltas[0]
    v1 = w0 + deltas[-1]
    w = slerp(cfg.t, v0, v1)
    return Merged(w - w0, weight=w)
