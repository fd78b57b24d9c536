"""The forms a residual takes on the fused path: what a codec declares (`Residual.runtime_form`)
so that the runtime (qmerge/nn/bank.py) stacks every task's residual of one weight the way the
ops take them, without knowing any codec.

    SignForm     packed signs [out, ceil(in/8)] uint8 + scales [R, G]  -> sign_linear /
                 dequant_add_sign; forms whose scales have the same G stack into one bank
    LowRankForm  U [out, r], V [r, in]                                 -> lowrank_linear
    DenseForm    the delta [out, in] fp32                               -> a delta-only GEMM

A new codec that can be written as one of these runs fused with no edit elsewhere; any other
codec falls back to DenseForm (correct, but it holds a dense matrix per task).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, eq=False)
class SignForm:
    """τ = scales ⊙ (2·bits − 1) in the op layout (shared/DESIGN.md, "Bit layout")."""

    packed: Tensor  # [out, ceil(in / 8)] uint8, LSB first
    scales: Tensor  # [R, G], R = 1 or out

    def stack_key(self) -> Hashable:
        return ("sign", self.scales.shape[1])


@dataclass(frozen=True, eq=False)
class LowRankForm:
    """τ = U @ V (fp32 factors; ranks may differ between tasks: the bank pads them)."""

    U: Tensor  # [out, r]
    V: Tensor  # [r, in]

    def stack_key(self) -> Hashable:
        return ("lowrank",)


@dataclass(frozen=True, eq=False)
class DenseForm:
    """τ itself, as an fp32 matrix."""

    delta: Tensor  # [out, in]

    def stack_key(self) -> Hashable:
        return ("dense",)


Form = SignForm | LowRankForm | DenseForm
