"""The `dense` codec: the delta itself in a float dtype (for norms, biases, small tensors, or
where nothing cheaper is accurate enough). Stored part: `delta` in the tensor's shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qmerge.codecs.base import FLOAT_DTYPES, Residual, check_choice, expect_part, register


@dataclass(frozen=True)
class DenseConfig:
    """Config of the `dense` codec.

    Attributes:
        dtype: "bf16" (default), "fp16" or "fp32" (lossless for fp32 fine-tunes).
    """

    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"

    def __post_init__(self):
        check_choice("DenseConfig", "dtype", self.dtype, tuple(FLOAT_DTYPES))


@register("dense", DenseConfig, "the delta itself in bf16 / fp16 / fp32 (fp32: lossless)")
class DenseResidual(Residual):
    def __init__(self, delta: Tensor):
        self.delta, self.shape = delta, tuple(delta.shape)

    @classmethod
    def from_dense(
        cls, delta: Tensor, cfg: DenseConfig, calib: Tensor | None = None
    ) -> DenseResidual:
        return cls(delta.to(FLOAT_DTYPES[cfg.dtype]).contiguous())

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        cfg: DenseConfig,
        shape: tuple[int, ...],
        info: Mapping[str, Any],
    ) -> DenseResidual:
        return cls(expect_part(parts, "delta", shape, (FLOAT_DTYPES[cfg.dtype],), "dense"))

    def parts(self) -> dict[str, Tensor]:
        return {"delta": self.delta}

    @classmethod
    def rows_independent(cls, cfg: DenseConfig) -> bool:
        return True

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.delta.to(dtype)
