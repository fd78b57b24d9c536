"""LiNeS (Wang et al. 2025, "LiNeS: post-training layer scaling prevents forgetting and
enhances model merging", arXiv:2410.17146): scale the merged task vector linearly with depth,
little in the shallow layers (which hold general features) and more in the deep ones:
λ(l) = α + β · l / (L − 1) for block l of L, on top of another merge method's shared delta.

Tensors outside the blocks: embeddings count as depth 0, the rest (final norms, pooler) as
the last block."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from qmerge.codecs.policy import module_type
from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, register
from qmerge.merge.spec import static


@dataclass(frozen=True)
class LinesConfig:
    """Attributes:
    alpha: the scale of the shallowest layer (default None: 1/T, the task average).
    beta: added to alpha across the depth, reached at the last block (default 0.5).
    inner: the static merge whose shared delta is scaled, as a method spec (default
        "task_arithmetic:scale=1.0", the plain sum, as in the paper).
    """

    alpha: float | None = None
    beta: float = 0.5
    inner: str = "task_arithmetic:scale=1.0"

    def __post_init__(self):
        for f in ("alpha", "beta"):
            v = getattr(self, f)
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"LinesConfig.{f} must be finite; got {v}")
        inner = static(self.inner, "LinesConfig.inner")
        if inner.method.name == "lines":
            raise ConfigError("LinesConfig.inner cannot be lines itself")
        object.__setattr__(self, "_inner", inner)  # parsed once; not a field


def depth_scale(cfg: LinesConfig, ctx: TensorCtx) -> float:
    alpha = 1 / len(ctx.tasks) if cfg.alpha is None else cfg.alpha
    last = max(ctx.n_layers - 1, 1)
    if ctx.depth is not None:
        depth = ctx.depth
    else:
        depth = 0 if module_type(ctx.name) == "embedding" else last
    return alpha + cfg.beta * min(depth, last) / last


@register(
    "lines",
    LinesConfig,
    "another merge scaled linearly with layer depth",
    "LiNeS, arXiv:2410.17146",
)
def lines(deltas: Tensor, cfg: LinesConfig, ctx: TensorCtx) -> Merged:
    shared = cfg._inner.run(deltas, ctx).shared  # type: ignore[attr-defined]
    assert shared is not None
    return Merged(shared.mul_(depth_scale(cfg, ctx)))
