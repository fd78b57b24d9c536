"""Patching a model in place with a pack: which layer becomes what, the routed forward and
generate, and `unload` that puts every original module back.

    Linear (or bitsandbytes 8/4-bit linear) with residuals  -> DeltaLinear
    Embedding with residuals                                 -> DeltaEmbedding
    a module whose weights are task heads (not in the base)  -> TaskHead
    any other module with residuals on its own parameters    -> DeltaParams (norms)

Model parameter names are matched to the pack's base tensor names up to a model prefix
(format/names.py); a tied weight (an LM head sharing the embedding) is found by identity and
shares the embedding's residuals, so nothing is held twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qmerge.codecs import Residual
from qmerge.codecs.skip import SkipResidual
from qmerge.errors import ConfigError
from qmerge.format.names import alignment
from qmerge.format.pack import Pack
from qmerge.nn import context
from qmerge.nn.bank import WeightBank
from qmerge.nn.cache import MergedCache
from qmerge.nn.delta_embedding import DeltaEmbedding
from qmerge.nn.delta_linear import DeltaLinear
from qmerge.nn.delta_params import DeltaParams
from qmerge.nn.features import features, resolve_layer
from qmerge.nn.runtime import Runtime
from qmerge.nn.task_head import TaskHead
from qmerge.routing.route import Route, resolve
from qmerge.routing.router import Router

BNB_LINEARS = ("Linear8bitLt", "Linear4bit")
ROUTE_KWARGS = ("task", "coeffs", "router", "per_token")


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or type(m).__name__ in BNB_LINEARS


def _has_past(kwargs: dict) -> bool:
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        return False
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length()) > 0
    return len(pkv) > 0


class Patched:
    """The qmerge state of a patched model, at `model.qmerge`."""

    def __init__(self, model: nn.Module, pack: Pack, residual: Callable[[str, str], Residual],
                 cache_bytes: int, mode: str, min_rows: int,
                 router: tuple[Router, dict] | None,
                 shared: Callable[[str], Residual] | None = None):
        self.model, self.pack = model, pack
        self.tasks = tuple(pack.tasks)
        self.runtime = Runtime(self.tasks, MergedCache(cache_bytes), mode, min_rows)
        self.router, self.router_entry = router if router else (None, None)
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        self._backbone: list[tuple[nn.Parameter, Tensor]] = []
        if shared is not None:
            self._add_shared(shared)
        self._patch(residual)
        self._orig_forward = model.forward
        self._wrap()

    # --- building ------------------------------------------------------------------------

    def _add_shared(self, shared: Callable[[str], Residual]) -> None:
        """A merged pack's shared delta goes into the backbone: each parameter it names gets
        a new tensor W0 + shared (fp32 sum, rounded once); the original stays for `unload`,
        so this costs one copy of those parameters."""
        names = set(self.pack.shared_entries())
        if not names:
            return
        params = list(self.model.named_parameters(remove_duplicate=False))
        _, rename = alignment([n for n, _ in params], set(self.pack.base_fingerprint["tensors"]))
        found: set[str] = set()
        try:
            for n, p in params:
                name = rename(n)
                if name not in names or name in found:
                    continue
                if not p.is_floating_point():
                    raise ConfigError(f"{self.pack.path}: is a merged pack whose shared delta "
                                      f"changes '{name}', which this model holds quantized "
                                      f"({p.dtype}); load the base in a float dtype")
                d = shared(name).dequantize(torch.float32).reshape(p.shape).to(p.device)
                self._backbone.append((p, p.data))
                p.data = (p.data.float() + d).to(p.dtype)
                found.add(name)
        except BaseException:
            self._restore_backbone()
            raise
        if missing := sorted(names - found):
            self._restore_backbone()
            raise ConfigError(f"{self.pack.path}: the shared delta changes '{missing[0]}', "
                              f"which the model does not have")

    def _restore_backbone(self) -> None:
        for p, orig in reversed(self._backbone):
            p.data = orig
        self._backbone.clear()

    def _patch(self, residual: Callable[[str, str], Residual]) -> None:
        model, pack = self.model, self.pack
        base_names = set(pack.base_fingerprint["tensors"])
        head_names = {n for t in self.tasks for n in pack.manifest["tasks"][t].get("heads", {})}
        params = list(model.named_parameters(remove_duplicate=False))
        _, rename = alignment([n for n, _ in params], base_names | head_names)
        by_id: dict[int, str] = {}
        for n, p in params:
            if rename(n) in base_names | head_names:
                by_id.setdefault(id(p), rename(n))
        for t in self.tasks:
            for n, e in pack.entries(t).items():
                if e.get("extra_rows", 0):
                    raise ConfigError(f"{pack.path}: task {t!r} grows '{n}' by {e['extra_rows']} "
                                      f"rows; loading a resized vocabulary is not supported")
        loaded: dict[str, list[Residual]] = {}

        def residuals(name: str) -> list[Residual] | None:
            if name not in loaded:
                rs = [residual(t, name) if name in pack.entries(t) else None for t in self.tasks]
                loaded[name] = [r if r is not None else SkipResidual(()) for r in rs]
            rs = loaded[name]
            return None if all(isinstance(r, SkipResidual) for r in rs) else rs

        banks: dict[str, WeightBank] = {}
        used: set[str] = set()

        def bank(name: str, shape: tuple[int, int], like: Tensor) -> WeightBank | None:
            rs = residuals(name)
            if rs is None:
                return None
            if name not in banks:
                banks[name] = WeightBank(rs, shape, like.dtype, like.device)
            used.add(name)
            return banks[name]

        def vectors(name: str, like: Tensor) -> Tensor | None:
            rs = residuals(name)
            if rs is None:
                return None
            used.add(name)
            return torch.stack([r.dequantize(torch.float32).reshape(like.shape)
                                if not isinstance(r, SkipResidual) else torch.zeros(like.shape)
                                for r in rs]).to(like.device, like.dtype)

        for mod_name, mod in list(model.named_modules()):
            own = dict(mod.named_parameters(recurse=False))
            names = {k: by_id.get(id(p)) for k, p in own.items()}
            if not any(names.values()):
                continue
            if any(v in head_names for v in names.values() if v):
                new = self._head(mod, mod_name, names)
                used.update(v for v in names.values() if v)
            elif _is_linear(mod):
                w = mod.weight
                wname, bname = names.get("weight"), names.get("bias")
                out, cols = mod.out_features, mod.in_features
                like = w if w.is_floating_point() else torch.empty(0, dtype=torch.float32)
                if type(mod) is not nn.Linear:
                    like = torch.empty(0, dtype=getattr(mod, "compute_dtype", None)
                                       or torch.float32, device=w.device)
                wb = bank(wname, (out, cols), like) if wname else None
                bd = vectors(bname, mod.bias) if bname and mod.bias is not None else None
                if wb is None and bd is None:
                    continue
                new = DeltaLinear(mod, wb, bd, self.runtime, wname or mod_name)
            elif type(mod) is nn.Embedding:
                wname = names.get("weight")
                wb = bank(wname, tuple(mod.weight.shape), mod.weight) if wname else None
                if wb is None:
                    continue
                new = DeltaEmbedding(mod, wb, self.runtime, wname)
            else:
                deltas = {k: d for k, v in names.items() if v
                          and (d := vectors(v, own[k])) is not None}
                if not deltas:
                    continue
                if any(own[k].dim() > 1 for k in deltas):
                    raise ConfigError(f"module '{mod_name}' ({type(mod).__name__}) has residuals "
                                      f"on a matrix but is not a Linear or Embedding; qmerge "
                                      f"cannot apply them per row")
                new = DeltaParams(mod, deltas, mod_name)
            self._replace(mod_name, new)
        missed = [n for t in self.tasks for n in pack.entries(t)
                  if n not in used and residuals(n) is not None]
        if missed:
            raise ConfigError(f"{pack.path}: tensor '{missed[0]}' has residuals but the model "
                              f"has no parameter for it ({len(set(missed))} such tensors); is "
                              f"this the pack's model architecture?")
        pack.close()

    def _head(self, mod: nn.Module, mod_name: str, names: dict[str, str | None]) -> TaskHead:
        if not _is_linear(mod):
            raise ConfigError(f"task head '{mod_name}' is a {type(mod).__name__}; only linear "
                              f"heads are supported")
        heads: dict[int, tuple[Tensor, Tensor | None]] = {}
        w = mod.weight
        for i, t in enumerate(self.tasks):
            stored = self.pack.heads(t)
            wn, bn = names.get("weight"), names.get("bias")
            if wn in stored:
                b = stored.get(bn) if bn else None
                heads[i] = (stored[wn].to(w.device, w.dtype).clone(),
                            None if b is None else b.to(w.device, w.dtype).clone())
        if not heads:
            raise ConfigError(f"no task has a head for '{mod_name}'")
        return TaskHead(mod, heads, mod_name)

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        self._originals.append((parent, child, getattr(parent, child)))
        setattr(parent, child, new)

    # --- routing -------------------------------------------------------------------------

    def _batch(self, args: tuple, kwargs: dict) -> int:
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if x is None:
            x = next((a for a in args if isinstance(a, Tensor)), None)
        if x is None:
            raise ConfigError("cannot tell the batch size: pass input_ids or inputs_embeds")
        return x.shape[0] if x.dim() > 1 else 1

    def _route(self, s: context.Spec, args: tuple, kwargs: dict) -> Route:
        """The route of this call, for its actual batch (beam search and
        num_return_sequences repeat each routed sequence)."""
        route = self._resolve(s, args, kwargs)
        return route if route.per_token else route.expand(self._batch(args, kwargs))

    def _resolve(self, s: context.Spec, args: tuple, kwargs: dict) -> Route:
        if s.resolved is not None and (s.pinned or _has_past(kwargs)):
            return s.resolved
        if s.per_token and _has_past(kwargs):
            raise ConfigError("per-token routing is for one full forward pass; route per "
                              "sequence when decoding with a KV cache")
        batch = self._batch(args, kwargs)
        if s.router:
            router = s.router if isinstance(s.router, Router) else self.router
            if router is None:
                raise ConfigError(f"{self.pack.path}: has no router; fit one with "
                                  f"`qmerge fit-router` or pass task=/coeffs=")
            inputs = dict(kwargs)
            if args and "input_ids" not in inputs:
                inputs["input_ids"] = args[0]
            pooling = "token" if s.per_token else (self.router_entry or {}).get("pooling", "mean")
            f = features(self._orig_forward, self.tasks, self.model, inputs,
                         resolve_layer(self.model, router.layer), pooling)
            route = router.route(f.reshape(-1, f.shape[-1]), self.tasks)
            if s.per_token:
                route = Route(self.tasks, coeffs=route.dense().reshape(*f.shape[:2], -1))
        else:
            route = resolve(self.tasks, batch, s.task, s.coeffs)
            if s.per_token and not route.per_token:
                raise ConfigError("per_token=True needs coeffs of shape [B, S, T] or router=True")
        s.resolved = route
        return route

    def _wrap(self) -> None:
        model, orig_forward = self.model, self._orig_forward

        @functools.wraps(orig_forward)
        def forward(*args, task=None, coeffs=None, router=None, per_token=False, **kwargs):
            s = context.Spec(task, coeffs, router or False, per_token)
            if not s.given():
                s = context.spec() or s
            route = self._route(s, args, kwargs)
            order = self._task_order(route, kwargs)
            if order is None:
                with context.using(route):
                    return orig_forward(*args, **kwargs)
            # Sequences of one task side by side: every layer then runs each task's rows as
            # one block, without gathering them (bench/results/routing-notes.md).
            batch = route.batch
            args = tuple(_take(a, order, batch) for a in args)
            kwargs = {k: _take(v, order, batch) for k, v in kwargs.items()}
            assert route.task_ids is not None
            with context.using(Route(route.tasks, task_ids=route.task_ids[order])):
                out = orig_forward(*args, **kwargs)
            return _untake(out, torch.argsort(order), batch)

        model.forward = forward
        if hasattr(model, "generate"):
            orig_generate = model.generate

            @functools.wraps(orig_generate)
            def generate(*args, task=None, coeffs=None, router=None, per_token=False, **kwargs):
                s = context.Spec(task, coeffs, router or False, per_token)
                if not s.given():
                    outer = context.spec()
                    s = context.Spec(outer.task, outer.coeffs, outer.router,
                                     outer.per_token) if outer else s
                if not s.router and not s.per_token:
                    # names and mixtures are per prompt: resolve them on the prompt batch,
                    # before generate repeats rows for beams or several returned sequences
                    s.resolved = resolve(self.tasks, self._batch(args, kwargs), s.task, s.coeffs)
                    s.pinned = True
                with context.asking(s):
                    return orig_generate(*args, **kwargs)

            model.generate = generate

    def _task_order(self, route: Route, kwargs: dict) -> Tensor | None:
        """A stable order that puts each task's sequences side by side, when reordering the
        batch is safe (no KV cache is read or written: an encoder, or use_cache=False) and
        useful (a mixed batch of task names whose tasks are not already together)."""
        if not self.runtime.sort_batches or route.task_ids is None or route.batch < 3:
            return None
        ids = route.task_ids
        if bool((ids[1:] >= ids[:-1]).all()) or route.uniform() is not None:
            return None
        cfg = getattr(self.model, "config", None)
        caches = (getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False)
                  or hasattr(self.model, "generate") and getattr(cfg, "use_cache", False))
        if kwargs.get("past_key_values") is not None or (caches and kwargs.get("use_cache")
                                                           is not False):
            return None
        return torch.sort(ids, stable=True).indices

    @contextmanager
    def route(self, task=None, coeffs=None, router=None, per_token: bool = False
              ) -> Iterator[None]:
        """Every forward (and generate) in this block, in this thread, uses this routing."""
        s = context.Spec(task, coeffs, router or False, per_token)
        with context.asking(s):
            yield

    def features(self, inputs: dict, layer: int | None = None, pooling: str = "mean") -> Tensor:
        """Router features of `inputs` (nn/features.py)."""
        return features(self._orig_forward, self.tasks, self.model, dict(inputs),
                        resolve_layer(self.model, layer), pooling)

    def set_mode(self, mode: str) -> None:
        self.runtime.set_mode(mode)
        self.runtime.cache.clear()

    def labels(self, task: str) -> list[str] | None:
        return self.pack.labels(task)

    def resident_bytes(self) -> dict:
        """Bytes qmerge holds beside the base: residual banks, head and vector deltas, cache."""
        seen: set[int] = set()
        banks = vecs = 0
        for m in self.model.modules():
            if isinstance(m, (DeltaLinear, DeltaEmbedding)) and m.bank is not None \
                    and id(m.bank) not in seen:
                seen.add(id(m.bank))
                banks += m.bank.nbytes()
            if isinstance(m, DeltaLinear) and m.bias_deltas is not None:
                vecs += m.bias_deltas.numel() * m.bias_deltas.element_size()
            if isinstance(m, DeltaParams):
                vecs += sum(d.numel() * d.element_size() for d in m.deltas.values())
            if isinstance(m, TaskHead):
                vecs += sum(w.numel() * w.element_size() + (0 if b is None else b.numel()
                            * b.element_size()) for w, b in m.heads.values())
        return {"residuals": banks, "vectors_and_heads": vecs,
                "cache": self.runtime.cache.stats()["bytes"]}

    def unload(self) -> nn.Module:
        """Puts every original module back and removes the routing wrappers."""
        for parent, child, orig in reversed(self._originals):
            setattr(parent, child, orig)
        self._originals.clear()
        self._restore_backbone()
        for attr in ("forward", "generate"):
            self.model.__dict__.pop(attr, None)
        self.runtime.cache.clear()
        self.model.__dict__.pop("qmerge", None)
        return self.model


def _take(v, order: Tensor, batch: int):
    """v with its batch rows in `order` (anything not batch-shaped as it is)."""
    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
        return v.index_select(0, order.to(v.device))
    return v


def _untake(out, inverse: Tensor, batch: int):
    """A model output with its batch rows put back (tensors, tuples of them, ModelOutputs)."""
    if isinstance(out, Tensor):
        return _take(out, inverse, batch)
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        return type(out)(_untake(v, inverse, batch) for v in out)
    if hasattr(out, "keys"):
        for k in list(out.keys()):
            out[k] = _untake(out[k], inverse, batch)
        return out
    return out


def patch(model: nn.Module, pack: Pack, residual: Callable[[str, str], Residual], *,
          cache_bytes: int = 256 << 20, mode: str = "auto", min_rows: int = 64,
          router: tuple[Router, dict] | None = None,
          shared: Callable[[str], Residual] | None = None) -> Patched:
    """Patches `model` with the pack's tasks; `residual(task, tensor)` reads a residual and
    `shared(tensor)` the shared delta of a merged pack (added into the backbone first)."""
    if isinstance(getattr(model, "qmerge", None), Patched):
        raise ConfigError("this model is already patched; call model.qmerge.unload() first")
    patched = Patched(model, pack, residual, cache_bytes, mode, min_rows, router, shared)
    model.qmerge = patched
    return patched

