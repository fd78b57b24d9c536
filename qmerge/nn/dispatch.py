"""Which module of a model becomes which qmerge wrapper: an ordered list of dispatchers, the
first that accepts a module wins (PEFT's dispatchers).

    task_head   a module whose weights are task heads (not in the base)  -> TaskHead
    linear      Linear (or bitsandbytes 8/4-bit linear) with residuals   -> DeltaLinear
    embedding   Embedding with residuals                                  -> DeltaEmbedding
    params      any other module with residuals on its own parameters    -> DeltaParams (norms)

Model parameter names are matched to the pack's base tensor names up to a model prefix
(format/names.py); a tied weight (an LM head sharing the embedding) is found by identity and
shares the embedding's residuals, so nothing is held twice. `plan` returns the replacements;
patch.py installs them and owns the routed forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qmerge.codecs import Residual
from qmerge.codecs.skip import SkipResidual
from qmerge.errors import ConfigError
from qmerge.format.names import alignment
from qmerge.format.pack import Pack
from qmerge.nn.bank import WeightBank
from qmerge.nn.delta_embedding import DeltaEmbedding
from qmerge.nn.delta_linear import DeltaLinear
from qmerge.nn.delta_params import DeltaParams
from qmerge.nn.runtime import Runtime
from qmerge.nn.task_head import TaskHead

BNB_LINEARS = ("Linear8bitLt", "Linear4bit")


def is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or type(m).__name__ in BNB_LINEARS


@dataclass
class Ctx:
    """What the dispatchers share while one model is patched: the pack, its residuals (read
    once per tensor), the banks built so far and the tensors used."""

    pack: Pack
    tasks: tuple[str, ...]
    runtime: Runtime
    read: Callable[[str, str], Residual]
    head_names: set[str]
    loaded: dict[str, list[Residual]] = field(default_factory=dict)
    banks: dict[str, WeightBank] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)

    def residuals(self, name: str) -> list[Residual] | None:
        """Every task's residual of base tensor `name`, or None when none changes it."""
        if name not in self.loaded:
            rs = [self.read(t, name) if name in self.pack.entries(t) else None for t in self.tasks]
            self.loaded[name] = [r if r is not None else SkipResidual(()) for r in rs]
        rs = self.loaded[name]
        return None if all(r.is_zero for r in rs) else rs

    def bank(self, name: str | None, shape: tuple[int, int], like: Tensor) -> WeightBank | None:
        if not name or (rs := self.residuals(name)) is None:
            return None
        if name not in self.banks:
            self.banks[name] = WeightBank(rs, shape, like.dtype, like.device)
        self.used.add(name)
        return self.banks[name]

    def vectors(self, name: str | None, like: Tensor | None) -> Tensor | None:
        """[T, *like.shape]: every task's residual of a vector parameter (zeros for none)."""
        if not name or like is None or (rs := self.residuals(name)) is None:
            return None
        self.used.add(name)
        return torch.stack(
            [
                r.dequantize(torch.float32).reshape(like.shape)
                if not r.is_zero
                else torch.zeros(like.shape)
                for r in rs
            ]
        ).to(like.device, like.dtype)


Names = dict[str, str | None]  # a module's own parameter -> the base (or head) tensor it is
Dispatcher = Callable[[Ctx, str, nn.Module, Names], nn.Module | None]


def task_head(ctx: Ctx, mod_name: str, mod: nn.Module, names: Names) -> nn.Module | None:
    if not any(v in ctx.head_names for v in names.values() if v):
        return None
    if not is_linear(mod):
        raise ConfigError(
            f"task head '{mod_name}' is a {type(mod).__name__}; only linear heads are supported"
        )
    heads: dict[int, tuple[Tensor, Tensor | None]] = {}
    w = mod.weight
    wn, bn = names.get("weight"), names.get("bias")
    for i, t in enumerate(ctx.tasks):
        stored = ctx.pack.heads(t)
        if wn in stored:
            b = stored.get(bn) if bn else None
            heads[i] = (
                stored[wn].to(w.device, w.dtype).clone(),
                None if b is None else b.to(w.device, w.dtype).clone(),
            )
    if not heads:
        raise ConfigError(f"no task has a head for '{mod_name}'")
    ctx.used.update(v for v in names.values() if v)
    return TaskHead(mod, heads, mod_name)


def linear(ctx: Ctx, mod_name: str, mod: nn.Module, names: Names) -> nn.Module | None:
    if not is_linear(mod):
        return None
    w = mod.weight
    like = w if w.is_floating_point() else torch.empty(0, dtype=torch.float32)
    if type(mod) is not nn.Linear:  # bitsandbytes: the residuals run in its compute dtype
        like = torch.empty(
            0, dtype=getattr(mod, "compute_dtype", None) or torch.float32, device=w.device
        )
    wname = names.get("weight")
    wb = ctx.bank(wname, (mod.out_features, mod.in_features), like)
    bd = ctx.vectors(names.get("bias"), mod.bias)
    if wb is None and bd is None:
        return mod
    return DeltaLinear(mod, wb, bd, ctx.runtime, wname or mod_name)


def embedding(ctx: Ctx, mod_name: str, mod: nn.Module, names: Names) -> nn.Module | None:
    if type(mod) is not nn.Embedding:
        return None
    wname = names.get("weight")
    wb = ctx.bank(wname, tuple(mod.weight.shape), mod.weight)
    return mod if wb is None else DeltaEmbedding(mod, wb, ctx.runtime, wname)


def params(ctx: Ctx, mod_name: str, mod: nn.Module, names: Names) -> nn.Module | None:
    own = dict(mod.named_parameters(recurse=False))
    deltas = {k: d for k, v in names.items() if (d := ctx.vectors(v, own[k])) is not None}
    if not deltas:
        return mod
    if any(own[k].dim() > 1 for k in deltas):
        raise ConfigError(
            f"module '{mod_name}' ({type(mod).__name__}) has residuals on a "
            f"matrix but is not a Linear or Embedding; qmerge cannot apply them "
            f"per row"
        )
    return DeltaParams(mod, deltas, mod_name)


# First match wins; a dispatcher returns the module itself to keep it as it is.
DISPATCHERS: list[Dispatcher] = [task_head, linear, embedding, params]


def plan(
    model: nn.Module,
    pack: Pack,
    tasks: tuple[str, ...],
    runtime: Runtime,
    read: Callable[[str, str], Residual],
) -> list[tuple[str, nn.Module]]:
    """(module name, its wrapper) for every module of `model` that the pack changes."""
    base_names = set(pack.base_fingerprint["tensors"])
    head_names = {n for t in tasks for n in pack.manifest["tasks"][t].get("heads", {})}
    for t in tasks:
        for n, e in pack.entries(t).items():
            if e.get("extra_rows", 0):
                raise ConfigError(
                    f"{pack.path}: task {t!r} grows '{n}' by {e['extra_rows']} "
                    f"rows; loading a resized vocabulary is not supported"
                )
    params_ = list(model.named_parameters(remove_duplicate=False))
    _, rename = alignment([n for n, _ in params_], base_names | head_names)
    by_id: dict[int, str] = {}
    for n, p in params_:
        if rename(n) in base_names | head_names:
            by_id.setdefault(id(p), rename(n))
    ctx = Ctx(pack, tasks, runtime, read, head_names)
    out = []
    for mod_name, mod in list(model.named_modules()):
        names = {k: by_id.get(id(p)) for k, p in mod.named_parameters(recurse=False)}
        if not any(names.values()):
            continue
        for dispatch in DISPATCHERS:
            new = dispatch(ctx, mod_name, mod, names)
            if new is not None:
                if new is not mod:
                    out.append((mod_name, new))
                break
    missed = [
        n
        for t in tasks
        for n in pack.entries(t)
        if n not in ctx.used and ctx.residuals(n) is not None
    ]
    if missed:
        raise ConfigError(
            f"{pack.path}: tensor '{missed[0]}' has residuals but the model has "
            f"no parameter for it ({len(set(missed))} such tensors); is this the "
            f"pack's model architecture?"
        )
    return out
