"""A Route: per-row task selection for one batch over a pack's tasks (in the pack's order).

Exactly one of
  task_ids [B] int64: each sequence's task index, -1 for the bare base;
  coeffs   [B, T] float32 (per sequence) or [B, S, T] (per token): a mixture over tasks,
           W(x) = W0 + sum_t c_t * dequant(tau_t); an all-zero row is the bare base.

The one grammar of routes as people write them, shared by Python, the CLI and HTTP:
`parse_route` reads 'base', 'auto', a task name or a mixture "math:0.7+code:0.3" once, at the
edge; `resolve` turns what a caller passes (a name, a list of names, a mixture, a dict, a
tensor) into a Route and names the offending entry when it cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qmerge.errors import ConfigError, UnknownTask

BASE = "base"  # the name a request uses for the bare base model
AUTO = "auto"  # the name a request uses for the pack's router
# The largest |weight| a mixture may give a task. Weights past it scale a task vector beyond
# any use and overflow activations to inf/NaN (a weight of 1e39 did, and its NaN logits failed
# the sampler for the other requests of a batch).
MAX_WEIGHT = 1000.0


@dataclass(frozen=True, eq=False)
class Route:
    tasks: tuple[str, ...]
    task_ids: Tensor | None = None
    coeffs: Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if (self.task_ids is None) == (self.coeffs is None):
            raise ConfigError("a Route needs exactly one of task_ids or coeffs")

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """A value derived from this route, computed once (every layer of a forward pass asks
        for the same row expansions; a Route lives for one call, in one thread)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def batch(self) -> int:
        t = self.task_ids if self.task_ids is not None else self.coeffs
        assert t is not None
        return t.shape[0]

    @property
    def per_token(self) -> bool:
        return self.coeffs is not None and self.coeffs.dim() == 3

    def expand(self, batch: int) -> Route:
        """The route for a batch that repeats each sequence k = batch / B times in a row (beam
        search, num_return_sequences)."""
        if batch == self.batch:
            return self
        return self.memo(("expand", batch), lambda: self._expand(batch))

    def _expand(self, batch: int) -> Route:
        if batch % self.batch:
            raise ConfigError(
                f"the batch has {batch} sequences but {self.batch} were routed; "
                f"route one task per sequence"
            )
        k = batch // self.batch
        if self.task_ids is not None:
            return Route(self.tasks, task_ids=self.task_ids.repeat_interleave(k))
        assert self.coeffs is not None
        return Route(self.tasks, coeffs=self.coeffs.repeat_interleave(k, 0))

    def uniform(self) -> Tensor | None:
        """The one coefficient vector [T] every row uses, or None if rows differ."""
        return self.memo("uniform", self._uniform)

    def _uniform(self) -> Tensor | None:
        if self.task_ids is not None:
            t = int(self.task_ids[0])
            if not bool((self.task_ids == t).all()):
                return None
            c = torch.zeros(len(self.tasks))
            if t >= 0:
                c[t] = 1.0
            return c
        assert self.coeffs is not None
        flat = self.coeffs.reshape(-1, self.coeffs.shape[-1])
        return flat[0].clone() if bool((flat == flat[0]).all()) else None

    def is_base(self) -> bool:
        return self.memo("is_base", self._is_base)

    def _is_base(self) -> bool:
        if self.task_ids is not None:
            return bool((self.task_ids < 0).all())
        assert self.coeffs is not None
        return not bool(self.coeffs.any())

    def used(self) -> list[int]:
        """Indices of the tasks some row uses."""
        if self.task_ids is not None:
            return sorted(int(t) for t in self.task_ids.unique() if t >= 0)
        assert self.coeffs is not None
        return self.coeffs.reshape(-1, len(self.tasks)).any(0).nonzero().flatten().tolist()

    def dense(self) -> Tensor:
        """coeffs [B, T] or [B, S, T] (one-hot of task_ids; base rows all zero)."""
        return self.memo("dense", self._dense)

    def _dense(self) -> Tensor:
        if self.coeffs is not None:
            return self.coeffs
        assert self.task_ids is not None
        c = torch.zeros(self.batch, len(self.tasks))
        rows = (self.task_ids >= 0).nonzero().flatten()
        c[rows, self.task_ids[rows]] = 1.0
        return c

    def names(self) -> list[str]:
        """A readable label per sequence: the task, 'base', or 'a:0.7+b:0.3'."""
        if self.task_ids is not None:
            return [self.tasks[t] if t >= 0 else BASE for t in self.task_ids.tolist()]
        out = []
        assert self.coeffs is not None
        for row in self.coeffs.reshape(self.batch, -1, len(self.tasks))[:, 0]:
            parts = [f"{self.tasks[t]}:{float(row[t]):.3g}" for t in row.nonzero().flatten()]
            out.append("+".join(parts) or BASE)
        return out


def parse_route(
    text: str | Mapping, tasks: Sequence[str], *, router: bool = False
) -> str | dict[str, float]:
    """A route as written: 'base', 'auto' (only where a router serves it), a task name, or a
    mixture 'a:0.7+b:0.3' (or a mapping) -> BASE, AUTO, the name, or {name: weight}.
    UnknownTask for a name that is no task; ConfigError for anything else malformed."""
    if isinstance(text, Mapping):
        return check_mixture(text, tasks, "route")
    if not isinstance(text, str):
        raise ConfigError(
            f"a route is a task name or a mixture such as 'a:0.7+b:0.3', got {text!r}"
        )
    if text == AUTO:
        if not router:
            raise ConfigError(
                "'auto' routes with the pack's router, and the pack has none; "
                "name a task (fit one with `qmerge fit-router`)"
            )
        return AUTO
    if text == BASE or text in tasks:
        return text
    if "+" in text or ":" in text:
        return parse_mixture(text, tasks)
    _index(text, tasks, "route")
    raise AssertionError("unreachable")


def parse_mixture(text: str, tasks: Sequence[str]) -> dict[str, float]:
    """'math:0.7+code:0.3' (or one name, weight 1) -> {name: weight}."""
    out: dict[str, float] = {}
    for item in text.split("+"):
        name, sep, w = item.strip().rpartition(":")
        if not sep:
            name, w = w, "1"
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(
                f"mixture {text!r}: weight {w!r} of {name!r} is not a number"
            ) from None
        if not math.isfinite(weight):
            raise ConfigError(f"mixture {text!r}: weight of {name!r} is not finite")
        _index(name, tasks, f"mixture {text!r}")
        out[name] = out.get(name, 0.0) + weight
    return _bounded(out, f"mixture {text!r}")


def _bounded(mix: dict[str, float], where: str) -> dict[str, float]:
    """`mix`, once every task's summed weight is within ±MAX_WEIGHT."""
    for name, w in mix.items():
        if not abs(w) <= MAX_WEIGHT:
            raise ConfigError(
                f"{where}: weight of {name!r} is {w:g}; weights are at most {MAX_WEIGHT:g} in size"
            )
    return mix


def _index(name: object, tasks: Sequence[str], where: str) -> int:
    if name is None or name == BASE:
        return -1
    if isinstance(name, int) and not isinstance(name, bool):
        if not -1 <= name < len(tasks):
            raise ConfigError(f"{where}: task index {name} is out of range (0..{len(tasks) - 1})")
        return name
    if not isinstance(name, str) or name not in tasks:
        raise UnknownTask(
            f"{where}: unknown task {name!r} (tasks: {', '.join(tasks)}; "
            f"'{BASE}' for the bare base)",
            str(name),
        )
    return tasks.index(name)


def check_mixture(spec: object, tasks: Sequence[str], where: str = "mixture") -> dict[str, float]:
    """A mixture given as a mapping (JSON, Python) checked once: {task: finite weight}; 'base'
    entries add nothing and are dropped."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where}: a mixture is a dict name -> weight or 'a:0.7+b:0.3', got "
            f"{type(spec).__name__}"
        )
    out: dict[str, float] = {}
    for name, w in spec.items():
        if _index(name, tasks, where) < 0:
            continue
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"{where}: weight of {name!r} must be a finite number, got {w!r}")
        out[name] = out.get(name, 0.0) + float(w)
    return _bounded(out, where)


def coefficients(rows: Sequence[object], tasks: Sequence[str]) -> Tensor:
    """[B, T] fp32 from parsed per-row routes ('base', a task name, or a checked mixture)."""
    c = torch.zeros(len(rows), len(tasks))
    for i, r in enumerate(rows):
        mix = r if isinstance(r, Mapping) else {} if r == BASE else {r: 1.0}
        for name, w in mix.items():
            c[i, list(tasks).index(name)] += w
    return c


def _row(spec: object, tasks: Sequence[str], where: str) -> Tensor:
    if spec is None or spec == BASE:
        return torch.zeros(len(tasks))
    if isinstance(spec, str):
        spec = parse_mixture(spec, tasks)
    return coefficients([check_mixture(spec, tasks, where)], tasks)[0]


def resolve(tasks: Sequence[str], batch: int, task: object = None, coeffs: object = None) -> Route:
    """What a caller asked for -> a Route for `batch` sequences.

    task: a name / index / 'base' for every sequence, or a list with one per sequence.
    coeffs: one mixture for every sequence (dict or 'a:0.7+b:0.3'), a list with one per
        sequence, or a tensor [T], [B, T] or [B, S, T] (per token) in the pack's task order.
    """
    tasks = tuple(tasks)
    if task is not None and coeffs is not None:
        raise ConfigError("pass task= or coeffs=, not both")
    if coeffs is None:
        if task is None:
            task = BASE
        names = list(task) if isinstance(task, (list, tuple)) else [task] * batch
        if len(names) != batch:
            raise ConfigError(f"task= lists {len(names)} tasks for a batch of {batch} sequences")
        ids = [_index(n, tasks, f"task[{i}]") for i, n in enumerate(names)]
        return Route(tasks, task_ids=torch.tensor(ids, dtype=torch.int64))
    if isinstance(coeffs, Tensor):
        c = coeffs.detach().to("cpu", torch.float32)
        if c.dim() == 1:
            c = c.expand(batch, -1)
        if c.dim() not in (2, 3) or c.shape[0] != batch or c.shape[-1] != len(tasks):
            raise ConfigError(
                f"coeffs tensor must be [T], [B, T] or [B, S, T] with B={batch}, "
                f"T={len(tasks)}; got {list(coeffs.shape)}"
            )
        if not bool(torch.isfinite(c).all()):
            raise ConfigError("coeffs has a NaN or infinite entry")
        return Route(tasks, coeffs=c.contiguous())
    rows = list(coeffs) if isinstance(coeffs, (list, tuple)) else [coeffs] * batch
    if len(rows) != batch:
        raise ConfigError(f"coeffs= lists {len(rows)} mixtures for a batch of {batch} sequences")
    return Route(
        tasks, coeffs=torch.stack([_row(r, tasks, f"coeffs[{i}]") for i, r in enumerate(rows)])
    )
