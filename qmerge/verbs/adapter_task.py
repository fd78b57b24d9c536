"""A PEFT LoRA adapter as a task of a pack (format/adapter.py reads it).

Each adapted module's residual is the adapter's own product, stored as the `lowrank` codec's
factors U = s·B, V = A in the adapter's dtype: exact, and no dense delta is ever built
(`Options.adapter_as="lora"`, the default). With `adapter_as="policy"` the product is
built per tensor and encoded like a fine-tune's delta under the policy (1-bit signs, say).
Tensors the adapter saves whole (`modules_to_save`) are fine-tuned values: their deltas are
stored dense in fp32 under "lora" (exact, like the factors) and through the policy under
"policy", like any fine-tune's; those the base lacks are task heads (`--head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qmerge.codecs.base import CodecChoice, exact_sum
from qmerge.codecs.encode import encode, entry_of
from qmerge.codecs.encode import entry as table_entry
from qmerge.codecs.lowrank import LowRankConfig, LowRankResidual
from qmerge.codecs.policy import resolve
from qmerge.dtypes import FLOAT_DTYPES
from qmerge.errors import CheckpointError, ConfigError
from qmerge.format.adapter import LoraAdapter
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.pack import part_key
from qmerge.format.safetensors_io import dtype_name
from qmerge.verbs.progress import bar
from qmerge.verbs.tensors import Options, encode_heads, encode_tensor, excluded, heads, specs

ADAPTER_AS = ("lora", "policy")
EXACT_WHOLE = "dense:dtype=fp32"  # saved modules under adapter_as="lora"
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


class Saved:
    """The tensors an adapter saves whole, under the base's names: a Checkpoint-like view
    (path, names, get, shape, dtype) for the fine-tune side of `encode_tensor`."""

    def __init__(self, adapter: LoraAdapter, rename: dict[str, str]):
        self.path = adapter.path
        self._t = {rename[n]: t for n, t in adapter.whole.items()}
        self.names = sorted(self._t)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def get(self, name: str) -> Tensor:
        return self._t[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._t[name].dtype


@dataclass
class AdapterTask:
    """An adapter checked against a base: which base tensor each module changes."""

    adapter: LoraAdapter
    modules: dict[str, str]  # base tensor -> adapted module
    saved: Saved  # whole tensors under base names (task heads included)

    @property
    def path(self) -> Path:
        return self.adapter.path


def _check_origin(adapter: LoraAdapter, base: Checkpoint, modules: dict[str, str]) -> None:
    """When the adapter's `base_model_name_or_path` is a local checkpoint other than `base`,
    the tensors it adapts must be the same bytes in both."""
    origin = adapter.config.get("base_model_name_or_path")
    if not isinstance(origin, str) or not origin or not Path(origin).exists():
        return
    if Path(origin).resolve() == base.path.resolve():
        return
    try:
        other = Checkpoint(origin).align_to(base.names)
    except CheckpointError:
        return  # not a checkpoint we can read: the names and shapes were checked
    for n in sorted(modules):
        if n not in other or other.digest(n) != base.digest(n):
            raise CheckpointError(
                f"{adapter.path}: was trained on {origin}, whose '{n}' differs from the base's "
                f"({base.path}); is it an adapter of this base?"
            )


def open_adapter(path: str | Path, base: Checkpoint, opts: Options) -> AdapterTask:
    """Opens an adapter and checks it against the base before anything is encoded: every
    adapted module names a base weight of the right shape, every whole tensor a base tensor
    of its shape (or a task head), and a local `base_model_name_or_path` is this base."""
    if opts.adapter_as not in ADAPTER_AS:
        raise ConfigError(f"adapter_as must be one of {', '.join(ADAPTER_AS)}")
    adapter = LoraAdapter(path)
    rename = adapter.base_names(base.names)
    modules: dict[str, str] = {}
    for m in sorted(adapter.factors):
        n = rename[f"{m}.weight"]
        if n not in base:
            raise CheckpointError(
                f"{adapter.path}: adapts module '{m}' but the base has no tensor '{m}.weight'; "
                "is it an adapter of this base?"
            )
        adapter.low_rank(m, base.shape(n))  # checks the factors' shapes
        modules[n] = m
    saved = Saved(adapter, rename)
    head = set(heads(base, saved, opts))
    for n in saved.names:
        if n in head:
            continue
        if n not in base:
            raise CheckpointError(
                f"{adapter.path}: saves tensor '{n}' that the base does not have; keep task "
                "heads per task with --head GLOB"
            )
        if saved.shape(n) != base.shape(n):
            raise CheckpointError(
                f"{adapter.path}: saves '{n}' with shape {list(saved.shape(n))} but the base's "
                f"is {list(base.shape(n))}"
            )
        if n in modules and not torch.equal(saved.get(n), base.get(n).to(saved.dtype(n))):
            raise CheckpointError(f"{adapter.path}: '{n}' is both adapted and saved changed")
    _check_origin(adapter, base, modules)
    return AdapterTask(adapter, modules, saved)


def _exact(
    n: str, module: str, kind: str, task: AdapterTask, base: Checkpoint
) -> tuple[dict, dict]:
    """The module's product as `lowrank` factors, as the adapter holds them."""
    lr = task.adapter.low_rank(module, base.shape(n))
    shape = tuple(base.shape(n))
    cfg = LowRankConfig(rank=lr.rank, factor_dtype=_DTYPE_NAMES[lr.U.dtype])
    res = LowRankResidual(lr.U, lr.V, shape, energy=1.0)
    stored = {part_key(n, k): v for k, v in res.parts().items()}
    U, V = lr.U.double(), lr.V.double()
    signal = exact_sum(((U.T @ U) * (V @ V.T)).reshape(-1))  # ‖U V‖², without U V
    info = res.info() | {"lora": {"kind": lr.kind, "scaling": lr.scaling}}
    dt = dtype_name(base.dtype(n))
    numel = shape[0] * shape[1]
    return stored, entry_of("lowrank", cfg, kind, list(shape), dt, numel, stored, signal, 0.0, info)


def _from_product(
    n: str,
    module: str,
    spec: tuple[str, CodecChoice],
    task: AdapterTask,
    base: Checkpoint,
    skip_below: float,
) -> tuple[dict, dict]:
    """The module's product built dense and encoded under the policy (adapter_as="policy")."""
    lr = task.adapter.low_rank(module, base.shape(n))
    d = (lr.U.float() @ lr.V.float()).reshape(base.shape(n))
    res, cfg, extra = encode(d, spec[1], None, skip_below)
    stored = {part_key(n, k): v.contiguous() for k, v in res.parts().items()}
    dt = dtype_name(base.dtype(n))
    return stored, table_entry(res, cfg, spec[0], list(base.shape(n)), dt, d, stored, extra)


def encode_adapter(
    name: str, base: Checkpoint, task: AdapterTask, opts: Options
) -> tuple[dict[str, Tensor], dict[str, dict], dict[str, Tensor], dict[str, dict]]:
    """(stored parts, codec table, head parts, head table) of an adapter task."""
    parts: dict[str, Tensor] = {}
    table: dict[str, dict] = {}
    spec = specs(name, base, opts, list(task.modules))
    for n in bar(sorted(task.modules), opts.progress, f"{name}: adapter", len(task.modules)):
        m = task.modules[n]
        if opts.adapter_as == "lora":
            stored, table[n] = _exact(n, m, spec[n][0], task, base)
        else:
            stored, table[n] = _from_product(n, m, spec[n], task, base, opts.policy.skip_below)
        parts.update(stored)
    head = set(heads(base, task.saved, opts))
    whole = [
        n
        for n in task.saved.names
        if n not in head and n not in task.modules and not excluded(n, opts.exclude)
    ]
    for n, spec in specs(name, base, opts, whole).items():
        if opts.adapter_as == "lora":  # exact, as the factors are
            spec = (spec[0], resolve(EXACT_WHOLE))
        stored, table[n] = encode_tensor(n, base, task.saved, spec, 0, opts.policy.skip_below)
        parts.update(stored)
    head_parts, head_table = encode_heads(base, task.saved, opts)
    return parts, table, head_parts, head_table


def summary(task: AdapterTask) -> dict:
    """What the pack's manifest records about the adapter a task came from."""
    c = task.adapter.config
    ranks = sorted({task.adapter.scaling(m)[0] for m in task.modules.values()})
    return {
        "peft_type": "LORA",
        "ranks": ranks,
        "lora_alpha": c.get("lora_alpha"),
        "use_rslora": bool(c.get("use_rslora")),
        "modules": len(task.modules),
        "saved": task.saved.names,
    }
