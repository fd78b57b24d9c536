"""The 1-bit codec: packed signs plus scales (BitDelta, Liu et al. 2024, arXiv:2402.10193;
1bit-Merging, 2025).

Semantics: τ ≈ s ⊙ sign(τ), sign(0) = +1, signs packed as in shared/DESIGN.md (8 per byte
along in_features, least significant bit first); `s` is one scale per row (default), one per
tensor, or one per row and group of columns. Without calibration each scale is the L2-optimal
`mean(|τ|)` over its group. With calibration inputs X [n, in_features] for the layer, the
scales instead minimise the layer-output error ‖X τᵀ − X τ̂ᵀ‖² in closed form (a per-row
least-squares fit, BitDelta's scale distillation done per layer without training).

Stored parts: `signs` uint8 [out, ceil(in/8)] and `scales` [R, G] (R = out or 1), in the layout
the ops take (`scales[None]` is their [T=1, R, G]); G groups of ceil(in/G) columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qmerge import ops
from qmerge.codecs.base import (
    FLOAT_DTYPES,
    Residual,
    as_matrix,
    check_choice,
    exact_sum,
    expect_part,
    register,
    runs_per_row,
    sq_chunks,
)
from qmerge.codecs.runtime import SignForm
from qmerge.errors import ConfigError

_CHUNK = 1 << 20  # elements per block of rows: bounds the temporaries of a large tensor


@dataclass(frozen=True)
class SignConfig:
    """Config of the `sign` codec.

    Attributes:
        granularity: "row" (one scale per output row, default), "tensor" (one scale), or
            "group" (per row and per group of `group_size` columns along in_features).
        group_size: target columns per group for granularity="group" (>= 8, default 128). The
            stored layout is the ops': G = ceil(in / group_size) groups of ceil(in / G)
            columns, so a group can be a little narrower than asked.
        scale_dtype: dtype the scales are stored in: "bf16" (default: fp32's range, and its
            0.4% rounding is far below the 1-bit error), "fp16" or "fp32".
        calibrate: when calibration inputs are given for a tensor, fit its scales to the
            layer's outputs (closed-form least squares) instead of mean(|τ|). Default False.
    """

    granularity: Literal["row", "tensor", "group"] = "row"
    group_size: int = 128
    scale_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    calibrate: bool = False

    def __post_init__(self):
        check_choice("SignConfig", "granularity", self.granularity, ("row", "tensor", "group"))
        check_choice("SignConfig", "scale_dtype", self.scale_dtype, tuple(FLOAT_DTYPES))
        if self.group_size < 8:
            raise ConfigError(f"SignConfig.group_size must be >= 8, got {self.group_size}")


def _groups(cfg: SignConfig, in_features: int) -> int:
    return math.ceil(in_features / cfg.group_size) if cfg.granularity == "group" else 1


def _group_abs_sums(block: Tensor, groups: int) -> Tensor:
    """Σ|τ| per row and group: [rows, in] -> [rows, G]."""
    if groups == 1:
        return block.abs().sum(1, keepdim=True, dtype=torch.float64)
    rows, cols = block.shape
    gs = ops.reference.group_size(cols, groups)
    padded = torch.nn.functional.pad(block.abs(), (0, groups * gs - cols))
    return padded.reshape(rows, groups, gs).sum(-1, dtype=torch.float64)


def _group_counts(in_features: int, groups: int) -> Tensor:
    gs = ops.reference.group_size(in_features, groups)
    starts = torch.arange(groups) * gs
    return (torch.clamp(in_features - starts, max=gs)).double()


def _calibrated(
    m: Tensor, signs: Tensor, x: Tensor, cfg: SignConfig, groups: int, fallback: Tensor
) -> Tensor:
    """Least-squares scales for the layer outputs on inputs x [n, in]; [R, G] fp64."""
    x = x.double()
    y = x @ m.double().T  # [n, out]: the layer-output change the delta causes
    s = signs.double()
    if cfg.granularity == "tensor":
        z = x @ s.T
        den = float((z * z).sum())
        return torch.tensor([[float((y * z).sum()) / den]]) if den > 0 else fallback
    if groups == 1:
        z = x @ s.T
        den = (z * z).sum(0)
        return torch.where(den > 0, (y * z).sum(0) / den.clamp_min(1e-300), fallback[:, 0])[:, None]
    gs = ops.reference.group_size(m.shape[1], groups)
    # z[o, n, g] = x[n, cols of g] · s[o, cols of g]
    z = torch.stack(
        [x[:, g * gs : (g + 1) * gs] @ s[:, g * gs : (g + 1) * gs].T for g in range(groups)], dim=-1
    ).transpose(0, 1)
    a = z.transpose(1, 2) @ z  # [out, G, G]
    b = (z.transpose(1, 2) @ y.T.unsqueeze(-1)).squeeze(-1)  # [out, G]
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
    a = a + ridge[:, None, None] * torch.eye(groups, dtype=a.dtype)
    sol = torch.linalg.solve(a, b)
    return torch.where(torch.isfinite(sol), sol, fallback)


@register(
    "sign",
    SignConfig,
    "1 bit per weight (packed signs) + per-row / per-tensor / "
    "per-group scales, optionally calibrated",
    "BitDelta, arXiv:2402.10193",
)
class SignResidual(Residual):
    def __init__(
        self, signs: Tensor, scales: Tensor, shape: tuple[int, ...], calibrated: bool = False
    ):
        self.signs, self.scales, self.shape = signs, scales, tuple(shape)
        self.calibrated = calibrated

    @property
    def in_features(self) -> int:
        return as_matrix(torch.empty(self.shape, device="meta")).shape[1]

    @classmethod
    def from_dense(
        cls, delta: Tensor, cfg: SignConfig, calib: Tensor | None = None
    ) -> SignResidual:
        m = as_matrix(delta.float()).contiguous()
        out, cols = m.shape
        groups = _groups(cfg, cols)
        signs = torch.empty(out, (cols + 7) // 8, dtype=torch.uint8)
        sums = torch.empty(out, groups, dtype=torch.float64)
        step = max(1, _CHUNK // max(cols, 1))
        for a in range(0, out, step):
            block = m[a : a + step]
            signs[a : a + step] = ops.pack_signs(block)
            sums[a : a + step] = _group_abs_sums(block, groups)
        counts = _group_counts(cols, groups)
        if cfg.granularity == "tensor":
            scales = torch.tensor([[exact_sum(sums) / (out * cols)]], dtype=torch.float64)
        else:
            scales = sums / counts
        calibrated = False
        if cfg.calibrate and calib is not None:
            calib = as_matrix(calib) if calib.dim() < 2 else calib.reshape(-1, calib.shape[-1])
            if calib.shape[1] != cols:
                raise ConfigError(
                    f"calibration inputs have {calib.shape[1]} features, the "
                    f"tensor has {cols} columns"
                )
            pm = ops.unpack_signs(signs, cols)
            scales = _calibrated(m, pm, calib, cfg, groups, scales)
            calibrated = True
        return cls(
            signs, scales.to(FLOAT_DTYPES[cfg.scale_dtype]).contiguous(), delta.shape, calibrated
        )

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        cfg: SignConfig,
        shape: tuple[int, ...],
        info: Mapping[str, Any],
    ) -> SignResidual:
        out, cols = as_matrix(torch.empty(shape, device="meta")).shape
        signs = expect_part(parts, "signs", (out, (cols + 7) // 8), (torch.uint8,), "sign")
        rows = 1 if cfg.granularity == "tensor" else out
        scales = expect_part(
            parts, "scales", (rows, _groups(cfg, cols)), (FLOAT_DTYPES[cfg.scale_dtype],), "sign"
        )
        return cls(signs, scales, shape, bool(info.get("calibrated", False)))

    def parts(self) -> dict[str, Tensor]:
        return {"signs": self.signs, "scales": self.scales}

    def info(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    def runtime_form(self) -> SignForm:
        return SignForm(self.signs, self.scales)

    def _rows(self, a: int, b: int) -> Tensor:
        """Rows [a, b) of the dequantized delta as a fp32 matrix, through the native op."""
        cols = self.in_features
        scales = self.scales if self.scales.shape[0] == 1 else self.scales[a:b]
        zero = torch.zeros(b - a, cols)
        return ops.dequant_add_sign(
            zero,
            self.signs[a:b].unsqueeze(0),
            scales.float().unsqueeze(0).contiguous(),
            torch.ones(1),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out = self.signs.shape[0]
        return self._rows(0, out).to(dtype).reshape(self.shape)

    def error_chunks(self, delta: Tensor) -> Tensor:
        m = as_matrix(delta.float())
        out, cols = m.shape
        step = max(1, _CHUNK // max(cols, 1))
        per_row = runs_per_row(cols)[1]
        chunks = torch.empty(out * per_row, dtype=torch.float64)  # first: see sq_chunks
        for a in range(0, out, step):
            b = min(out, a + step)
            chunks[a * per_row : b * per_row] = sq_chunks(m[a:b], self._rows(a, b))
        return chunks

    @classmethod
    def rows_independent(cls, cfg: SignConfig) -> bool:
        return cfg.granularity != "tensor" and not cfg.calibrate
