"""Generalized task arithmetic: per-task weights, a sparsification of each task vector, an
optional sign consensus, and a normalization, as mergekit composes them (its TIES, DARE,
Breadcrumbs and DELLA are instances). With every weight 1 and no sparsification it is
task arithmetic; `qmerge merge --config` maps mergekit's methods of this family onto it, so
a recipe gives mergekit's weights (tests/merge/test_gta.py, bench/merge_vs_mergekit.py).

For one tensor, tasks t with weights w_t and deltas τ_t:

    d_t = sparsify(τ_t) · w_t
    consensus "sum":  m_t = [sign d_t == (Σ d ≥ 0 ? +1 : −1)]   (zero entries never agree)
                      mixed = Σ m_t d_t, divisor = Σ m_t w_t (0 → 1)
    no consensus:     mixed = Σ d_t,     divisor = Σ w_t + base_weight (|·| < 1e-8 → 1)
    shared = λ · (mixed / divisor if normalize else mixed)

Sparsifications (density k of the entries kept, per task):
    magnitude  the ⌊k·n⌋ (at least 1) largest magnitudes, in `torch.argsort` order at ties
    outliers   Breadcrumbs (arXiv:2312.06795): drop the ⌊γ·n⌋ largest as outliers and the
               smallest, keeping ⌊k·n⌋
    magprune   DELLA's MAGPRUNE (arXiv:2406.11617): per row, keep each entry with a
               probability from k − ε (smallest) to k + ε (largest) by magnitude rank
    random     DARE (arXiv:2311.03099): keep each entry with probability k
`rescale` then scales each sparsified vector back to its L1 norm (DARE's and DELLA's 1/k in
expectation, mergekit's "rescale"). Random draws are seeded from the merge's seed, the
tensor's name and the task (dare.generator): reproducible, not mergekit's draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qmerge.codecs.base import check_choice
from qmerge.errors import ConfigError
from qmerge.merge.base import Merged, TensorCtx, check_fraction, register
from qmerge.merge.dare import generator

SPARSIFY = ("none", "magnitude", "outliers", "magprune", "random")


def numbers(text: str, what: str) -> list[float]:
    """'0.5/0.3/1' (or space-separated) -> [0.5, 0.3, 1.0]; finite numbers only."""
    try:
        values = [float(v) for v in text.replace(" ", "/").split("/") if v]
    except ValueError:
        raise ConfigError(f"{what} must be numbers separated by '/'; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be finite numbers; got {text!r}")
    return values


def per_task(text: str, n: int, default: float, what: str) -> list[float]:
    """'0.5/0.3/1' -> [0.5, 0.3, 1.0] for n tasks; '' -> [default] * n."""
    if not text:
        return [default] * n
    values = numbers(text, what)
    if len(values) != n:
        raise ConfigError(f"{what} gives {len(values)} values for {n} tasks")
    return values


@dataclass(frozen=True)
class GtaConfig:
    """Attributes:
    sparsify: none, magnitude (TIES), outliers (Breadcrumbs), magprune (DELLA), random (DARE).
    consensus: none, or sum (TIES's sign election).
    density: the share of entries each task keeps (default 1.0).
    densities: per task, '/'-separated (overrides density).
    weights: per task weights, '/'-separated (default 1 each).
    gamma: the share dropped as outliers (outliers; default 0.01).
    epsilon: the spread of keep probabilities (magprune; default 0.15).
    normalize: divide by the summed weights (of the agreeing tasks, with consensus).
    rescale: scale each sparsified task vector back to its L1 norm.
    scale: λ, applied last (default 1.0).
    base_weight: the base's own weight among averaged models (counts in the divisor).
    seed: the random draws' seed.
    """

    sparsify: Literal["none", "magnitude", "outliers", "magprune", "random"] = "none"
    consensus: Literal["none", "sum"] = "none"
    density: float = 1.0
    densities: str = ""
    weights: str = ""
    gamma: float = 0.01
    epsilon: float = 0.15
    normalize: bool = False
    rescale: bool = False
    scale: float = 1.0
    base_weight: float = 0.0
    seed: int = 0

    def __post_init__(self):
        name = type(self).__name__
        check_choice(name, "sparsify", self.sparsify, SPARSIFY)
        check_choice(name, "consensus", self.consensus, ("none", "sum"))
        check_fraction(name, "density", self.density, lo_open=True)
        check_fraction(name, "gamma", self.gamma)
        for f in ("scale", "base_weight", "epsilon"):
            if not math.isfinite(getattr(self, f)):
                raise ConfigError(f"{name}.{f} must be finite; got {getattr(self, f)}")
        for f in ("weights", "densities"):
            numbers(getattr(self, f), f"{name}.{f}")


def _magnitude(d: Tensor, k: float) -> Tensor:
    n = d.numel()
    keep = max(1, int(k * n))
    mask = torch.zeros(n, dtype=d.dtype)
    mask[torch.argsort(d.abs().reshape(-1).float(), descending=True)[:keep]] = 1
    return d * mask.reshape(d.shape)


def _outliers(d: Tensor, k: float, gamma: float) -> Tensor:
    n = d.numel()
    keep, top = int(k * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=d.dtype)
    mask[torch.sort(d.abs().reshape(-1).float()).indices[bottom : bottom + keep]] = 1
    return d * mask.reshape(d.shape)


def _magprune(d: Tensor, k: float, eps: float, g: torch.Generator) -> Tensor:
    if not (0 < k - eps and k + eps < 1):
        raise ConfigError(f"magprune needs density ± epsilon in (0, 1); got {k} ± {eps}")
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    ranks = rows.abs().argsort(1).argsort(1).to(torch.float32) + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    probs = (k - eps) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * eps
    return (rows * torch.bernoulli(probs, generator=g)).reshape(d.shape)


def _l1_rescaled(d: Tensor, kept: Tensor) -> Tensor:
    before, after = d.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def sparsified(d: Tensor, cfg: GtaConfig, k: float, ctx: TensorCtx, t: int) -> Tensor:
    """One task's delta through the config's sparsification (and L1 rescale)."""
    if cfg.sparsify == "none" or k >= 1:
        return d
    if cfg.sparsify == "magnitude":
        kept = _magnitude(d, k)
    elif cfg.sparsify == "outliers":
        kept = _outliers(d, k, cfg.gamma)
    elif cfg.sparsify == "magprune":
        kept = _magprune(d, k, cfg.epsilon, generator(cfg.seed, ctx.name, t))
    else:
        g = generator(cfg.seed, ctx.name, t)
        kept = d * torch.bernoulli(torch.full_like(d, k), generator=g)
    return _l1_rescaled(d, kept) if cfg.rescale else kept


def gta_merge(deltas: Tensor, cfg: GtaConfig, ctx: TensorCtx) -> Tensor:
    """The shared delta of the module docstring's formula. Memory: one stack of the tasks'
    sparsified vectors (`deltas` itself when `ctx.scratch`) and a few single tensors; the sums
    over tasks run in task order, as mergekit's do."""
    T = deltas.shape[0]
    ws = per_task(cfg.weights, T, 1.0, "weights")
    ks = per_task(cfg.densities, T, cfg.density, "densities")
    d = deltas if ctx.scratch else torch.empty_like(deltas)
    for t in range(T):
        s = sparsified(deltas[t], cfg, ks[t], ctx, t)
        if s.data_ptr() != d[t].data_ptr():
            d[t].copy_(s)
        del s
        if ws[t] != 1:
            d[t].mul_(ws[t])
    if cfg.consensus == "sum":
        positive = d.sum(0) >= 0  # the elected sign: + where the sum is >= 0
        mixed, divisor = torch.zeros_like(d[0]), torch.zeros_like(d[0])
        for t in range(T):
            agree = torch.where(positive, d[t] > 0, d[t] < 0)  # a zero entry never agrees
            mixed.add_(torch.where(agree, d[t], 0.0))
            divisor.add_(agree.to(d.dtype).mul_(ws[t]))
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(0)
        divisor = torch.tensor(ws, dtype=d.dtype).sum() + cfg.base_weight
        if abs(float(divisor)) < 1e-8:
            divisor = torch.ones((), dtype=d.dtype)
    if cfg.normalize:
        mixed.div_(divisor)
    return mixed.mul_(cfg.scale) if cfg.scale != 1 else mixed


@register(
    "gta",
    GtaConfig,
    "generalized task arithmetic: per-task weights, sparsify, sign consensus, normalize "
    "(mergekit's task_arithmetic, ties, dare, breadcrumbs, della, linear)",
    "arXiv:2306.01708; arXiv:2312.06795; arXiv:2406.11617",
)
def gta(deltas: Tensor, cfg: GtaConfig, ctx: TensorCtx) -> Merged:
    return Merged(gta_merge(deltas, cfg, ctx))
