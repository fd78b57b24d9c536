"""`auto`: per tensor, the cheapest codec that reaches an SQNR target.

Candidates are priced before anything is encoded (a low-rank candidate's rank is the smallest
that keeps the energy the target implies), then tried from the cheapest up; the first whose
measured SQNR meets the target is kept. `dense` at fp32 always meets it, so there is always an
answer. The SQNR of a tensor is 10·log10(‖τ‖² / ‖τ − τ̂‖²).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

from qmerge.codecs import lowrank
from qmerge.codecs.base import (
    FLOAT_DTYPES,
    Residual,
    as_matrix,
    codec,
    parse_spec,
    sq_sum,
    sqnr_db,
)
from qmerge.codecs.dense import DenseConfig
from qmerge.errors import ConfigError

DEFAULT_CANDIDATES = (
    "sign:granularity=tensor",
    "sign",
    "sign:granularity=group,group_size=64",
    "lowrank",
    "lowrank:factor_dtype=int8",
    "dense:dtype=bf16",
    "dense:dtype=fp32",
)


@dataclass(frozen=True)
class AutoConfig:
    """Config of `auto` (a chooser, not a stored codec: the table records what it chose).

    Attributes:
        sqnr_db: the target SQNR in dB (default 6.0; 1-bit signs give about 4.4 dB on a
            Gaussian delta, more on heavy-tailed ones).
        candidates: codec specs to consider (default: sign per tensor / row / group of 64,
            low rank bf16 / int8, dense bf16 / fp32). A low-rank candidate's rank is set by
            the target.
    """

    sqnr_db: float = 6.0
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES

    def __post_init__(self):
        if not 0 < self.sqnr_db < 300:
            raise ConfigError(f"AutoConfig.sqnr_db must be in (0, 300), got {self.sqnr_db}")
        for spec in self.candidates:
            parse_spec(spec)


def _price(name: str, cfg, m: Tensor, energy: float) -> tuple[int, object]:
    out, cols = m.shape
    if name == "sign":
        groups = 1 if cfg.granularity != "group" else -(-cols // cfg.group_size)
        rows = 1 if cfg.granularity == "tensor" else out
        return out * ((cols + 7) // 8) + rows * groups * FLOAT_DTYPES[cfg.scale_dtype].itemsize, cfg
    if name == "lowrank":
        cfg = dataclasses.replace(cfg, energy=energy, budget_bits=None)
        s = lowrank.svd(m.float(), min(cfg.max_rank or min(m.shape), min(m.shape)), cfg)[1]
        kept = (s.double() ** 2).cumsum(0) / max(sq_sum(m), 1e-300)
        hit = (kept >= energy).nonzero()
        r = int(hit[0]) + 1 if hit.numel() else min(m.shape)
        return r * cfg.bytes_per_rank(out, cols), dataclasses.replace(cfg, energy=None, rank=r)
    if name == "dense":
        return m.numel() * FLOAT_DTYPES[cfg.dtype].itemsize, cfg
    return 0, cfg


def choose(
    delta: Tensor, cfg: AutoConfig, calib: Tensor | None = None
) -> tuple[Residual, object, float | None]:
    """(the cheapest residual meeting cfg.sqnr_db, the config that made it, its SQNR in dB).
    If none meets the target, the candidate with the best SQNR."""
    m = as_matrix(delta.float())
    signal = sq_sum(m)
    energy = 1 - 10 ** (-cfg.sqnr_db / 10)
    priced = []
    for i, spec in enumerate(cfg.candidates):
        name, c = parse_spec(spec)
        if name == "lowrank" and min(m.shape) < 2:
            continue
        nbytes, c = _price(name, c, m, energy)
        priced.append((nbytes, i, name, c))
    priced.sort(key=lambda p: (p[0], p[1]))
    best = None
    for _, _, name, c in priced:
        res = codec(name).residual.from_dense(delta, c, calib)
        db = sqnr_db(signal, res.error_energy(delta))
        if db is None or db >= cfg.sqnr_db:
            return res, c, db
        if best is None or db > best[2]:
            best = (res, c, db)
    if best is None:  # no candidate applies (e.g. only lowrank for a vector)
        c = DenseConfig("fp32")
        res = codec("dense").residual.from_dense(delta, c)
        return res, c, sqnr_db(signal, res.error_energy(delta))
    return best


__all__ = ["AutoConfig", "choose"]
