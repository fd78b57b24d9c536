"""What an export bakes in: one task, a mixture of tasks, or the pack's shared delta.

In a merged pack every selection also bakes in the shared delta (W0 + shared is the backbone
the tasks' exclusive parts sit on); `shared=True` selects it alone, with no task on top.

A selection is a coefficient per task (W = W0 + sum_t c_t * dequant(tau_t), the routed model's
semantics for that mixture) plus, for packs whose tasks have heads, the head those
coefficients give: the routed TaskHead computes sum_t c_t * head_t(x), which is the one linear
layer sum_t c_t * (W_t, b_t); the tasks mixed must then have heads of the same width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from qmerge.errors import ConfigError
from qmerge.format.pack import Pack
from qmerge.routing.route import BASE, parse_mixture


@dataclass(frozen=True)
class Selection:
    coeffs: dict[str, float]  # task -> weight, zero weights dropped; {} is the bare base
    describe: str  # "task 'math'" / "mixture math:0.7+code:0.3"

    def route(self) -> dict:
        """The keyword arguments that route the qmerge model the same way."""
        if len(self.coeffs) == 1 and next(iter(self.coeffs.values())) == 1.0:
            return {"task": next(iter(self.coeffs))}
        return {"coeffs": dict(self.coeffs) if self.coeffs else BASE}

    def used(self) -> list[str]:
        return list(self.coeffs)


def select(
    pack: Pack,
    task: str | None = None,
    coeffs: str | Mapping[str, float] | None = None,
    shared: bool = False,
) -> Selection:
    """The selection named by exactly one of `task`, `coeffs` ('a:0.7+b:0.3' or a dict) and
    `shared`; unknown tasks and non-finite weights are refused naming them."""
    given = [
        n
        for n, v in (("task", task), ("coeffs", coeffs), ("shared", shared or None))
        if v is not None
    ]
    if len(given) != 1:
        raise ConfigError(
            "say what to export with exactly one of task=, coeffs= or shared=True "
            f"(got {', '.join(given) or 'none'})"
        )
    if shared:
        # a merged pack's backbone (W0 + shared) is in every export of it; this one is that
        # alone: the static merge
        if not pack.shared_entries():
            raise ConfigError(
                f"{pack.path}: the pack has no shared delta (`qmerge merge` "
                f"writes one); export a task or a mixture"
            )
        return Selection({}, "the shared delta (the static merge)")
    if task is not None:
        if task == BASE:
            return Selection({}, "the bare base")
        mix = parse_mixture(task, pack.tasks)
        if len(mix) != 1 or "+" in task or ":" in task:
            raise ConfigError(f"task {task!r}: name one task (use coeffs= for a mixture)")
        return Selection({task: 1.0}, f"task {task!r}")
    assert coeffs is not None
    if isinstance(coeffs, str):
        text = coeffs
        mix = parse_mixture(coeffs, pack.tasks)
    elif isinstance(coeffs, Mapping):
        text = "+".join(f"{k}:{v:g}" for k, v in coeffs.items())
        mix = parse_mixture(text, pack.tasks) if coeffs else {}
    else:
        raise ConfigError(f"coeffs must be 'a:0.7+b:0.3' or a dict, got {type(coeffs).__name__}")
    kept = {t: w for t, w in mix.items() if w != 0.0}
    return Selection(kept, f"mixture {text}")


def head(pack: Pack, sel: Selection) -> tuple[dict[str, Tensor], list[str] | None]:
    """The head tensors (name -> fp32) and label names the selection gives; ({}, None) for a
    pack without heads."""
    if not any(pack.manifest["tasks"][t].get("heads") for t in pack.tasks):
        return {}, None
    if not sel.coeffs:
        raise ConfigError(
            f"{pack.path}: the tasks have their own heads, and {sel.describe} "
            f"has none to export; name a task or a mixture"
        )
    out: dict[str, Tensor] = {}
    labels: list[str] | None = None
    for t, c in sel.coeffs.items():
        h = pack.heads(t)
        if not h:
            raise ConfigError(
                f"{pack.path}: task {t!r} has no head; it cannot be exported from "
                f"a pack whose tasks are classifiers"
            )
        if out and {k: tuple(v.shape) for k, v in h.items()} != {
            k: tuple(v.shape) for k, v in out.items()
        }:
            raise ConfigError(
                f"{sel.describe}: tasks with heads of different shapes (numbers "
                f"of labels) cannot be mixed into one head"
            )
        for k, v in h.items():
            out[k] = out.get(k, torch.zeros(v.shape)) + c * v.float()
        lab = pack.labels(t)
        if labels is None:
            labels = lab
        elif lab != labels:
            labels = [f"LABEL_{i}" for i in range(len(labels))]  # mixed label sets: positions
    return out, labels
