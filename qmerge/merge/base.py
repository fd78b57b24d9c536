"""What every merge method shares: the registry, the per-tensor inputs and the result.

A merge method is a frozen config dataclass (fields documented, validated in `__post_init__`,
the paper cited in its module) and a function over one base tensor at a time:

    fn(deltas [T, *shape] fp32, cfg, ctx) -> Merged(shared, exclusive)

`shared` is the delta every task gets (it goes into the backbone: W = W0 + shared + excl_t);
`exclusive` is, per task, the rest of its delta (a dense tensor that the pack then encodes
with the exclusive codec, an already encoded Residual, or None for nothing), or None when the
method has no per-task part (a static merge); `weight`, optionally, the merged weight
W0 + shared as a method that mixes full weights computed it (as mergekit does). Working a
tensor at a time keeps the memory of a merge at T copies of one tensor, never a model per
task.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor

from qmerge.codecs import Residual
from qmerge.codecs.base import build_config
from qmerge.errors import ConfigError
from qmerge.registry import Registry

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class TensorCtx:
    """Where a tensor sits: its name, its block index (None outside the blocks), the number
    of blocks, the task names, and the merge's seed (methods that sample derive theirs from
    seed and name, so a tensor's result does not depend on the order tensors are merged)."""

    name: str
    depth: int | None
    n_layers: int
    tasks: tuple[str, ...]
    seed: int = 0
    base: Tensor | None = None  # the base tensor, fp32, for methods that need it (SLERP)
    scratch: bool = False  # the method may overwrite `deltas` (the caller does not reuse them)


@dataclass
class Merged:
    shared: Tensor | None
    exclusive: list[Tensor | Residual | None] | None = None
    # a method that mixes full weights (with `TensorCtx.base`) may give the merged weight
    # itself too: the direct merge writes it as it is, rather than W0 + shared
    weight: Tensor | None = None


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    static: it makes only a shared delta (no per-task parts), so it can be the inner merge
        of another method (LiNeS, Twin).
    linear: for a method whose shared delta is `linear(cfg) · Σ_t τ_t`, that scale: the merge
        then sums 1-bit residuals straight from their packed bits.
    needs_base: it reads the base's weights too (`TensorCtx.base`; the merge needs --base).
    """

    name: str
    config: type
    fn: Callable[[Tensor, Any, TensorCtx], Merged]
    summary: str
    static: bool = True
    linear: Callable[[Any], float] | None = None
    needs_base: bool = False


METHODS: Registry[Method] = Registry("merge method")


def register(
    name: str,
    config: type,
    summary: str,
    paper: str = "",
    *,
    static: bool = True,
    linear: Callable[[Any], float] | None = None,
    needs_base: bool = False,
):
    """Function decorator: registers `fn(deltas, cfg, ctx) -> Merged` as method `name`."""

    def deco(fn):
        m = Method(name, config, fn, summary, static, linear, needs_base)
        METHODS.register(name, m, summary, paper)
        return fn

    return deco


def method(name: str) -> Method:
    return METHODS.lookup(name)


class MethodChoice(NamedTuple):
    """A merge method with its config: what a method spec parses to, once."""

    method: Method
    config: Any

    def run(self, deltas: Tensor, ctx: TensorCtx) -> Merged:
        return self.method.fn(deltas, self.config, ctx)


def make_config(name: str, values: Mapping[str, object]) -> Any:
    """The config of method `name` from field values (strings from the CLI, or JSON values)."""
    return build_config(method(name).config, values, f"merge method {name!r}")


def choose(name: str, values: Mapping[str, object] | Any = None) -> MethodChoice:
    """Method `name` with a config: built from field values (a mapping), or given as the
    method's config dataclass, or its defaults (None)."""
    m = method(name)
    if values is None or isinstance(values, Mapping):
        return MethodChoice(m, build_config(m.config, values or {}, f"merge method {name!r}"))
    if not isinstance(values, m.config):
        raise ConfigError(f"config for {name!r} must be a {m.config.__name__}")
    return MethodChoice(m, values)


def layer_index(name: str) -> int | None:
    """The block index in a tensor name ('encoder.layer.3.attention...' -> 3), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def check_fraction(
    cls: str, field: str, v: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    if not ok:
        lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{cls}.{field} must be in {lo}0, 1{hi}; got {v}")
