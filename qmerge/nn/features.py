"""Router features from the base model: the hidden state after block `layer`, pooled.

Cost: one partial forward of the *base* (every patched layer runs its base path) through the
embeddings and blocks 1..layer, stopped there by a hook; nothing after that block runs. What
is reused: the caller's tokenized inputs; in `generate` the routing runs once, on the prompt,
and its result serves every decoding step. The routed forward then runs the whole model with
the chosen tasks (blocks before `layer` cannot be reused, since their weights change).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qmerge.errors import ConfigError
from qmerge.nn import context
from qmerge.routing.route import Route


class _Stop(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the longest ModuleList, preferring one of
    config.num_hidden_layers entries)."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(
            "the model has no list of blocks (nn.ModuleList) to take router features from"
        )
    exact = [m for m in lists if len(m) == want]
    return exact[0] if exact else max(lists, key=len)


def resolve_layer(model: nn.Module, layer: int | None) -> int:
    """1..L (after that block); None picks 2/3 of the depth; negative counts from the end."""
    n = len(blocks(model))
    if layer is None:
        return max(1, round(2 * n / 3))
    if layer < 0:
        layer = n + 1 + layer
    if not 1 <= layer <= n:
        raise ConfigError(f"router layer must be in 1..{n} (or -{n}..-1), got {layer}")
    return layer


def pool(hidden: Tensor, mask: Tensor | None, how: str) -> Tensor:
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    m = mask[..., None].to(hidden.dtype)
    if how == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    if how == "last":
        last = mask.long().cumsum(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0]), last]
    if how == "token":
        return hidden
    raise ConfigError(f"pooling must be 'mean', 'last' or 'token', got {how!r}")


def features(
    forward: Callable,
    tasks: tuple[str, ...],
    model: nn.Module,
    inputs: dict,
    layer: int,
    pooling: str = "mean",
) -> Tensor:
    """[B, D] (or [B, S, D] with pooling='token') float32 features of `inputs`."""
    block = blocks(model)[layer - 1]

    def hook(_mod, _args, out):
        raise _Stop(out[0] if isinstance(out, (tuple, list)) else out)

    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if ids is None:
        raise ConfigError("router features need input_ids (or inputs_embeds)")
    base = Route(tasks, task_ids=torch.full((ids.shape[0],), -1, dtype=torch.int64))
    handle = block.register_forward_hook(hook)
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "past_key_values")}
    if getattr(getattr(model, "config", None), "use_cache", False):
        kwargs["use_cache"] = False
    try:
        with context.using(base), torch.no_grad():
            forward(**kwargs)
    except _Stop as stop:
        hidden = stop.hidden
    else:
        raise ConfigError(f"block {layer} did not run in the forward pass")
    finally:
        handle.remove()
    return pool(hidden.float(), inputs.get("attention_mask"), pooling)
