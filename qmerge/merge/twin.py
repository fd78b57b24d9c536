"""Twin-Merging (Lu et al. 2024, "Twin-Merging: dynamic integration of modular expertise in
model merging", arXiv:2406.15479): the shared knowledge is a static merge of the tasks; each
task's exclusive knowledge is what its vector adds beyond it, τ_t − shared, stored compressed
(1-bit or low-rank: the pack's exclusive codec) and routed at inference."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from qmerge.merge.base import Merged, TensorCtx, register
from qmerge.merge.spec import static


@dataclass(frozen=True)
class TwinConfig:
    """Attributes:
    shared: the static merge that makes the shared delta, as a method spec (default
        "ties"; the paper uses task arithmetic or TIES).
    """

    shared: str = "ties"

    def __post_init__(self):
        object.__setattr__(self, "_shared", static(self.shared, "TwinConfig.shared"))


@register(
    "twin",
    TwinConfig,
    "static merge shared + compressed per-task remainders, routed",
    "Twin-Merging, arXiv:2406.15479",
    static=False,
)
def twin(deltas: Tensor, cfg: TwinConfig, ctx: TensorCtx) -> Merged:
    shared = cfg._shared.run(deltas, ctx).shared  # type: ignore[attr-defined]
    assert shared is not None
    return Merged(shared, [d - shared for d in deltas])
