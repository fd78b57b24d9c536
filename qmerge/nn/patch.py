"""Patching a model in place with a pack: the routed forward and generate, and `unload` that
puts every original module back. Which module becomes which wrapper is dispatch.py's; a merged
pack's shared delta goes into the backbone (backbone.py) first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qmerge.codecs import Residual
from qmerge.errors import ConfigError
from qmerge.format.pack import Pack
from qmerge.nn import context, dispatch
from qmerge.nn.backbone import Backbone
from qmerge.nn.cache import MergedCache
from qmerge.nn.delta_embedding import DeltaEmbedding
from qmerge.nn.delta_linear import DeltaLinear
from qmerge.nn.delta_params import DeltaParams
from qmerge.nn.features import features, resolve_layer
from qmerge.nn.runtime import Runtime
from qmerge.nn.task_head import TaskHead
from qmerge.routing.route import Route, resolve
from qmerge.routing.router import Router

ROUTE_KWARGS = ("task", "coeffs", "router", "per_token")


def _has_past(kwargs: dict) -> bool:
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        return False
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length()) > 0
    return len(pkv) > 0


class Patched:
    """The qmerge state of a patched model, at `model.qmerge`."""

    def __init__(
        self,
        model: nn.Module,
        pack: Pack,
        residual: Callable[[str, str], Residual],
        cache_bytes: int,
        mode: str,
        min_rows: int,
        router: tuple[Router, dict] | None,
        shared: Callable[[str], Residual] | None = None,
    ):
        self.model, self.pack = model, pack
        self.tasks = tuple(pack.tasks)
        self.runtime = Runtime(self.tasks, MergedCache(cache_bytes), mode, min_rows)
        self.router, self.router_entry = router if router else (None, None)
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        self._backbone = Backbone()
        if shared is not None:
            self._backbone.add(model, pack, shared)
        try:
            self._patch(residual)
        except BaseException:
            self._backbone.restore()
            raise
        self._orig_forward = model.forward
        self._wrap()

    # --- building ------------------------------------------------------------------------

    def _patch(self, residual: Callable[[str, str], Residual]) -> None:
        for name, new in dispatch.plan(self.model, self.pack, self.tasks, self.runtime, residual):
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            self._originals.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
        self.pack.close()

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
            raise ConfigError(
                "per-token routing is for one full forward pass; route per "
                "sequence when decoding with a KV cache"
            )
        batch = self._batch(args, kwargs)
        if s.router:
            router = s.router if isinstance(s.router, Router) else self.router
            if router is None:
                raise ConfigError(
                    f"{self.pack.path}: has no router; fit one with "
                    f"`qmerge fit-router` or pass task=/coeffs="
                )
            inputs = dict(kwargs)
            if args and "input_ids" not in inputs:
                inputs["input_ids"] = args[0]
            pooling = "token" if s.per_token else (self.router_entry or {}).get("pooling", "mean")
            f = features(
                self._orig_forward,
                self.tasks,
                self.model,
                inputs,
                resolve_layer(self.model, router.layer),
                pooling,
            )
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
                    s = (
                        context.Spec(outer.task, outer.coeffs, outer.router, outer.per_token)
                        if outer
                        else s
                    )
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
        caches = (
            getattr(cfg, "is_decoder", False)
            or getattr(cfg, "is_encoder_decoder", False)
            or hasattr(self.model, "generate")
            and getattr(cfg, "use_cache", False)
        )
        if kwargs.get("past_key_values") is not None or (
            caches and kwargs.get("use_cache") is not False
        ):
            return None
        return torch.sort(ids, stable=True).indices

    @contextmanager
    def route(self, task=None, coeffs=None, router=None, per_token: bool = False) -> Iterator[None]:
        """Every forward (and generate) in this block, in this thread, uses this routing."""
        s = context.Spec(task, coeffs, router or False, per_token)
        with context.asking(s):
            yield

    def features(self, inputs: dict, layer: int | None = None, pooling: str = "mean") -> Tensor:
        """Router features of `inputs` (nn/features.py)."""
        return features(
            self._orig_forward,
            self.tasks,
            self.model,
            dict(inputs),
            resolve_layer(self.model, layer),
            pooling,
        )

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
            if (
                isinstance(m, (DeltaLinear, DeltaEmbedding))
                and m.bank is not None
                and id(m.bank) not in seen
            ):
                seen.add(id(m.bank))
                banks += m.bank.nbytes()
            if isinstance(m, DeltaLinear) and m.bias_deltas is not None:
                vecs += m.bias_deltas.numel() * m.bias_deltas.element_size()
            if isinstance(m, DeltaParams):
                vecs += sum(d.numel() * d.element_size() for d in m.deltas.values())
            if isinstance(m, TaskHead):
                vecs += sum(
                    w.numel() * w.element_size()
                    + (0 if b is None else b.numel() * b.element_size())
                    for w, b in m.heads.values()
                )
        return {
            "residuals": banks,
            "vectors_and_heads": vecs,
            "cache": self.runtime.cache.stats()["bytes"],
        }

    def unload(self) -> nn.Module:
        """Puts every original module back and removes the routing wrappers."""
        for parent, child, orig in reversed(self._originals):
            setattr(parent, child, orig)
        self._originals.clear()
        self._backbone.restore()
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


def patch(
    model: nn.Module,
    pack: Pack,
    residual: Callable[[str, str], Residual],
    *,
    cache_bytes: int = 256 << 20,
    mode: str = "auto",
    min_rows: int = 64,
    router: tuple[Router, dict] | None = None,
    shared: Callable[[str], Residual] | None = None,
) -> Patched:
    """Patches `model` with the pack's tasks; `residual(task, tensor)` reads a residual and
    `shared(tensor)` the shared delta of a merged pack (added into the backbone first)."""
    if isinstance(getattr(model, "qmerge", None), Patched):
        raise ConfigError("this model is already patched; call model.qmerge.unload() first")
    patched = Patched(model, pack, residual, cache_bytes, mode, min_rows, router, shared)
    model.qmerge = patched
    return patched
