"""The `mask` codec: a task's delta as a 1-bit mask over the pack's shared (unified) delta plus
one rescaler (EMR-Merging, Huang et al. 2024, arXiv:2405.17461): τ_t ≈ λ_t · M_t ⊙ τ_uni.

A pack holds the *exclusive* residual over a backbone that already has the shared delta
(shared/DESIGN.md, "The pack"), so what this codec reads back is the difference from the
backbone: (λ_t · M_t − 1) ⊙ τ_uni. It only exists inside a merged pack: reading it needs the
shared tensor, which `qmerge.verbs.packs.residual` passes in as the part `unified` (never stored in
the task file).

Stored parts: `mask` uint8 [out, ceil(in/8)] (the sign-bit layout: bit 1 keeps the element)
and `scale` fp32 [1] (λ_t).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qmerge import ops
from qmerge.codecs.base import Residual, as_matrix, expect_part, register


@dataclass(frozen=True)
class MaskConfig:
    """Config of the `mask` codec (no options: the merge method decides mask and rescaler)."""


@register(
    "mask",
    MaskConfig,
    "a 1-bit mask + rescaler over a merged pack's shared delta (written by the emr merge)",
    "EMR-Merging, arXiv:2405.17461",
)
class MaskResidual(Residual):
    needs_shared = True

    def __init__(self, mask: Tensor, scale: Tensor, unified: Tensor | None, shape: tuple[int, ...]):
        self.mask, self.scale, self.unified, self.shape = mask, scale, unified, tuple(shape)

    @classmethod
    def from_mask(cls, keep: Tensor, scale: float, unified: Tensor) -> MaskResidual:
        """From a boolean keep-mask shaped like the tensor, λ, and the unified delta."""
        m = as_matrix(keep)
        packed = ops.pack_signs(torch.where(m, 1.0, -1.0))
        return cls(packed, torch.tensor([float(scale)]), unified, tuple(keep.shape))

    @classmethod
    def from_dense(
        cls, delta: Tensor, cfg: MaskConfig, calib: Tensor | None = None
    ) -> MaskResidual:
        raise NotImplementedError(
            "the mask codec is written by the EMR merge method "
            "(qmerge.merge.emr), not from a delta alone"
        )

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        cfg: MaskConfig,
        shape: tuple[int, ...],
        info: Mapping[str, Any],
    ) -> MaskResidual:
        out, cols = as_matrix(torch.empty(shape, device="meta")).shape
        mask = expect_part(parts, "mask", (out, (cols + 7) // 8), (torch.uint8,), "mask")
        scale = expect_part(parts, "scale", (1,), (torch.float32,), "mask")
        unified = parts.get("unified")
        if unified is None:
            raise ValueError(
                "a mask residual needs the pack's shared delta (it is read "
                "through qmerge.verbs.packs.residual)"
            )
        if tuple(unified.shape) != tuple(shape):
            raise ValueError(
                f"the shared delta is {list(unified.shape)}, the residual {list(shape)}"
            )
        return cls(mask, scale, unified, shape)

    def parts(self) -> dict[str, Tensor]:
        return {"mask": self.mask, "scale": self.scale}

    def info(self) -> dict[str, Any]:
        return {"scale": float(self.scale)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        assert self.unified is not None
        u = as_matrix(self.unified.float())
        keep = ops.unpack_signs(self.mask, u.shape[1], torch.float32) > 0
        out = torch.where(keep, float(self.scale) - 1.0, -1.0) * u
        return out.reshape(self.shape).to(dtype)
