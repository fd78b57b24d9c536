"""The `skip` codec: nothing is stored and the delta reads back as zero. The compressor uses
it for every tensor whose delta is exactly zero (frozen layers) or whose largest magnitude is
at most the policy's `skip_below`; a policy can also name it to drop a module type's deltas."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qmerge.codecs.base import Residual, register, sq_chunks


@dataclass(frozen=True)
class SkipConfig:
    """Config of the `skip` codec (no options)."""


@register("skip", SkipConfig, "nothing stored: the delta reads back as zero")
class SkipResidual(Residual):
    is_zero = True

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    @classmethod
    def from_dense(
        cls, delta: Tensor, cfg: SkipConfig, calib: Tensor | None = None
    ) -> SkipResidual:
        return cls(tuple(delta.shape))

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        cfg: SkipConfig,
        shape: tuple[int, ...],
        info: Mapping[str, Any],
    ) -> SkipResidual:
        if parts:
            raise ValueError(f"skip residual stores nothing, found parts {sorted(parts)}")
        return cls(shape)

    def parts(self) -> dict[str, Tensor]:
        return {}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(self.shape, dtype=dtype)

    def error_chunks(self, delta: Tensor) -> Tensor:
        return sq_chunks(delta)

    @classmethod
    def rows_independent(cls, cfg: SkipConfig) -> bool:
        return True
