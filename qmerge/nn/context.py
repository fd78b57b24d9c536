"""The route the running forward pass uses, per thread (and per asyncio task).

Layers read `active()`; the patched model's forward sets it for the duration of one call. A
`Spec` is what a caller asked for (names, mixtures, the router); it becomes a Route when the
batch is known, and is kept across the decoding steps of one `generate` so the router runs
once per prompt, not once per token. Context variables give every thread its own value, which
is what makes concurrent calls with different tasks safe.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

from qmerge.routing.route import Route


@dataclass
class Spec:
    task: object = None
    coeffs: object = None
    router: bool = False
    per_token: bool = False
    resolved: Route | None = field(default=None, compare=False)  # set by the first forward
    pinned: bool = False  # resolved once for a whole `generate` call (from its prompt batch)

    def given(self) -> bool:
        return self.task is not None or self.coeffs is not None or self.router


_ACTIVE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("qmerge_route", default=None)
_SPEC: contextvars.ContextVar[Spec | None] = contextvars.ContextVar("qmerge_spec", default=None)


def active() -> Route | None:
    return _ACTIVE.get()


def spec() -> Spec | None:
    return _SPEC.get()


@contextlib.contextmanager
def using(route: Route | None) -> Iterator[None]:
    token = _ACTIVE.set(route)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def asking(s: Spec) -> Iterator[Spec]:
    token = _SPEC.set(s)
    try:
        yield s
    finally:
        _SPEC.reset(token)
