"""The `lowrank` codec: truncated SVD factors (Efficient Residual Encoding; LoRA-style).

Semantics: τ ≈ U @ V with U [out, r] = U_s·√S and V [r, in] = √S·V_sᵀ from τ = U_s S V_sᵀ,
the rank r fixed, or the smallest that keeps a fraction of ‖τ‖², or allocated across all the
task's tensors from one byte budget (`allocate_ranks`). Large matrices use randomized SVD
(Halko, Martinsson & Tropp 2011) with a fixed seed, so the same input gives the same factors.

Stored parts: `U` [out, r] and `V` [r, in] in the factor dtype; with int8 factors also
`U_scale` [out] and `V_scale` [r] (fp32, symmetric per-row absmax / 127).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qmerge.codecs.base import (
    FLOAT_DTYPES,
    Residual,
    as_matrix,
    check_choice,
    expect_part,
    register,
    sq_sum,
)
from qmerge.codecs.runtime import LowRankForm
from qmerge.errors import ConfigError

_RANDOMIZED_MIN_DIM = 1024


@dataclass(frozen=True)
class LowRankConfig:
    """Config of the `lowrank` codec.

    Attributes:
        rank: the rank kept (>= 1, default 16; capped at min(out, in)). Used unless `energy`
            or `budget_bits` is set.
        energy: if set (0 < energy <= 1), the smallest rank whose singular values keep this
            fraction of ‖τ‖² (SQNR = −10·log10(1 − energy) dB before factor rounding).
        budget_bits: if set (> 0), a byte budget for every tensor of the task that uses this
            config, as mean bits per parameter: ranks are given greedily to the components
            that remove the most squared error per byte.
        max_rank: ceiling for `energy` and `budget_bits` (default: min(out, in)).
        factor_dtype: "bf16" (default), "fp16", "fp32", or "int8" (per-row scales).
        randomized: "auto" (default: randomized SVD when min(out, in) >= 1024 and the rank
            is under a quarter of it), "always" or "never".
        seed: seed of the randomized SVD (default 0).
    """

    rank: int = 16
    energy: float | None = None
    budget_bits: float | None = None
    max_rank: int | None = None
    factor_dtype: Literal["bf16", "fp16", "fp32", "int8"] = "bf16"
    randomized: Literal["auto", "always", "never"] = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LowRankConfig.rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"LowRankConfig.energy must be in (0, 1], got {self.energy}")
        if self.budget_bits is not None and not self.budget_bits > 0:
            raise ConfigError(f"LowRankConfig.budget_bits must be > 0, got {self.budget_bits}")
        if self.energy is not None and self.budget_bits is not None:
            raise ConfigError("LowRankConfig: set at most one of energy and budget_bits")
        if self.max_rank is not None and self.max_rank < 1:
            raise ConfigError(f"LowRankConfig.max_rank must be >= 1, got {self.max_rank}")
        check_choice("LowRankConfig", "factor_dtype", self.factor_dtype, (*FLOAT_DTYPES, "int8"))
        check_choice("LowRankConfig", "randomized", self.randomized, ("auto", "always", "never"))

    def bytes_per_rank(self, out: int, cols: int) -> int:
        """Stored bytes one unit of rank costs for an [out, cols] matrix."""
        if self.factor_dtype == "int8":
            return out + cols + 4
        return (out + cols) * FLOAT_DTYPES[self.factor_dtype].itemsize


def svd(m: Tensor, q: int, cfg: LowRankConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Leading q singular triplets of m [out, in] (fp32): U [out, q], S [q], Vh [q, in]."""
    full = min(m.shape)
    q = min(q, full)
    use_rand = cfg.randomized == "always" or (
        cfg.randomized == "auto" and full >= _RANDOMIZED_MIN_DIM and 4 * q < full
    )
    if use_rand:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            u, s, v = torch.svd_lowrank(m, q=min(full, q + 8), niter=4)
        return u[:, :q], s[:q], v[:, :q].T
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :q], s[:q], vh[:q]


def spectrum(delta: Tensor, cfg: LowRankConfig) -> Tensor:
    """Singular values (up to max_rank) of a delta, for budget allocation."""
    m = as_matrix(delta.float())
    q = min(cfg.max_rank or min(m.shape), min(m.shape))
    return svd(m, q, cfg)[1]


def allocate_ranks(spectra: Sequence[Tensor], costs: Sequence[int], budget: float) -> list[int]:
    """Greedy ranks: take components in order of squared singular value per byte while the
    total stays within `budget` bytes. Spectra are descending, so each tensor gets a prefix."""
    gains = [
        (float(s) ** 2 / c, i)
        for i, (sp, c) in enumerate(zip(spectra, costs, strict=True))
        for s in sp
    ]
    gains.sort(key=lambda g: -g[0])
    ranks = [0] * len(spectra)
    spent = 0.0
    for _, i in gains:
        if spent + costs[i] <= budget:
            ranks[i] += 1
            spent += costs[i]
    return ranks


def _quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    scale = t.abs().amax(1).clamp_min(1e-30) / 127
    return torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


@register(
    "lowrank",
    LowRankConfig,
    "truncated SVD factors U V: a fixed rank, an energy share, or a byte budget over the task",
    "Efficient Residual Encoding; Halko et al. 2011",
)
class LowRankResidual(Residual):
    threads_matter = True  # its SVDs (LAPACK, BLAS) sum in an order set by the thread count

    def __init__(
        self,
        U: Tensor,
        V: Tensor,
        shape: tuple[int, ...],
        U_scale: Tensor | None = None,
        V_scale: Tensor | None = None,
        energy: float | None = None,
    ):
        self.U, self.V, self.shape = U, V, tuple(shape)
        self.U_scale, self.V_scale, self.energy = U_scale, V_scale, energy

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @classmethod
    def from_dense(
        cls, delta: Tensor, cfg: LowRankConfig, calib: Tensor | None = None, rank: int | None = None
    ) -> LowRankResidual:
        m = as_matrix(delta.float())
        full = min(m.shape)
        total = sq_sum(m)
        cap = min(cfg.max_rank or full, full)
        if rank is not None:
            u, s, vh = svd(m, min(rank, full), cfg)
        elif cfg.energy is not None:
            q = min(cap, 64)
            while True:
                u, s, vh = svd(m, q, cfg)
                kept = torch.cumsum(s.double() ** 2, 0) / max(total, 1e-300)
                hit = (kept >= cfg.energy - 1e-12).nonzero()
                if hit.numel() or q >= cap:
                    r = int(hit[0]) + 1 if hit.numel() else q
                    break
                q = min(cap, 2 * q)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, vh = svd(m, min(cfg.rank, full), cfg)
        root = s.clamp_min(0).sqrt()
        U, V = (u * root).contiguous(), (root[:, None] * vh).contiguous()
        energy = float((s.double() ** 2).sum() / total) if total > 0 else 1.0
        if cfg.factor_dtype == "int8":
            (Uq, us), (Vq, vs) = _quantize_rows(U), _quantize_rows(V)
            return cls(Uq, Vq, delta.shape, us, vs, energy)
        dt = FLOAT_DTYPES[cfg.factor_dtype]
        return cls(U.to(dt), V.to(dt), delta.shape, energy=energy)

    @classmethod
    def from_parts(
        cls,
        parts: Mapping[str, Tensor],
        cfg: LowRankConfig,
        shape: tuple[int, ...],
        info: Mapping[str, Any],
    ) -> LowRankResidual:
        out, cols = as_matrix(torch.empty(shape, device="meta")).shape
        if "U" not in parts or parts["U"].dim() != 2:
            raise ValueError("lowrank residual has no 2-D part 'U'")
        r = parts["U"].shape[1]
        if cfg.factor_dtype == "int8":
            U = expect_part(parts, "U", (out, r), (torch.int8,), "lowrank")
            V = expect_part(parts, "V", (r, cols), (torch.int8,), "lowrank")
            us = expect_part(parts, "U_scale", (out,), (torch.float32,), "lowrank")
            vs = expect_part(parts, "V_scale", (r,), (torch.float32,), "lowrank")
            return cls(U, V, shape, us, vs, info.get("energy"))
        dt = (FLOAT_DTYPES[cfg.factor_dtype],)
        return cls(
            expect_part(parts, "U", (out, r), dt, "lowrank"),
            expect_part(parts, "V", (r, cols), dt, "lowrank"),
            shape,
            energy=info.get("energy"),
        )

    def parts(self) -> dict[str, Tensor]:
        p = {"U": self.U, "V": self.V}
        if self.U_scale is not None:
            p |= {"U_scale": self.U_scale, "V_scale": self.V_scale}
        return p

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "energy": self.energy}

    def runtime_form(self) -> LowRankForm:
        return LowRankForm(*self.factors(torch.float32))

    @classmethod
    def plans(cls, cfg: LowRankConfig) -> bool:
        return cfg.budget_bits is not None

    @classmethod
    def plan_item(cls, cfg: LowRankConfig, delta: Tensor) -> tuple[Tensor, int, int]:
        """(spectrum, bytes per unit of rank, parameters) of one tensor."""
        return spectrum(delta, cfg), cfg.bytes_per_rank(*as_matrix(delta).shape), delta.numel()

    @classmethod
    def plan_from(
        cls, cfg: LowRankConfig, items: Sequence[tuple[str, tuple[Tensor, int, int]]]
    ) -> dict[str, dict[str, Any]]:
        """Ranks from one byte budget over every tensor given (`allocate_ranks` over their
        spectra); a tensor given rank 0 stores nothing (None)."""
        spectra = [s for _, (s, _, _) in items]
        costs = [c for _, (_, c, _) in items]
        params = sum(p for _, (_, _, p) in items)
        ranks = allocate_ranks(spectra, costs, cfg.budget_bits / 8 * params)
        return {n: {"rank": r} if r else None for (n, _), r in zip(items, ranks, strict=True)}

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(U [out, r], V [r, in]) dequantized to `dtype`."""
        U, V = self.U.float(), self.V.float()
        if self.U_scale is not None:
            U, V = U * self.U_scale[:, None], V * self.V_scale[:, None]
        return U.to(dtype), V.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        U, V = self.factors(torch.float32)
        return (U @ V).to(dtype).reshape(self.shape)
