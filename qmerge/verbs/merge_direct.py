"""A static merge straight to a model directory: a recipe's fine-tunes merged into a Hugging
Face checkpoint in one streaming pass, with no pack in between (`qmerge merge --config`).

For each base tensor in turn: every fine-tune's fp32 delta (memory-mapped inputs), the
method's shared delta, W0 + shared cast to the output dtype, written at its place in the
output's safetensors file(s), whose headers are known before any tensor is computed. Memory
holds T + 2 fp32 copies of one tensor, never a model; the directory is built beside `out`
and swapped in when complete. config.json, the tokenizer and generation files come from the
base.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from qmerge.errors import ConfigError, PackError
from qmerge.format.atomic import staged_dir
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.safetensors_io import write_header, write_tensor
from qmerge.merge.base import MethodChoice, TensorCtx, layer_index
from qmerge.verbs.export.target import copy_side_files
from qmerge.verbs.tensors import Options, plan

INDEX = "model.safetensors.index.json"
MAX_SHARD = 5 << 30  # bytes per safetensors file, as mergekit and transformers shard


def _shards(specs: list[tuple[str, torch.dtype, tuple]], limit: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, dt, shape) in enumerate(specs):
        size = math.prod(shape) * dt.itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _merged_tensor(
    n: str,
    base: Checkpoint,
    fts: dict[str, Checkpoint],
    choice: MethodChoice,
    n_layers: int,
) -> Tensor:
    """W0 + the method's shared delta for one tensor, fp32."""
    w0 = base.get(n).to(torch.float32)
    deltas = torch.empty((len(fts), *w0.shape), dtype=torch.float32)
    for i, ft in enumerate(fts.values()):
        deltas[i].copy_(ft.get(n))
        deltas[i].sub_(w0)
    ctx = TensorCtx(n, layer_index(n), n_layers, tuple(fts), 0, w0, scratch=True)
    merged = choice.run(deltas, ctx)
    del deltas
    if merged.weight is not None:  # mixed from full weights: as the method rounded it
        return merged.weight
    return w0 if merged.shared is None else w0.add_(merged.shared)


def merge_to_model(
    base: str | os.PathLike,
    models: dict[str, str | os.PathLike],
    choice: MethodChoice,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    max_shard_bytes: int = MAX_SHARD,
) -> dict:
    """Merges fine-tunes of `base` with a static method into a model directory at `out`.

    Args:
        base: the base checkpoint; models: task name -> fine-tuned checkpoint (checked
            against the base, names and shapes, before any tensor is merged).
        choice: a static merge method with its config (one that makes only a shared delta).
        dtype: the output's float dtype (default: the base's, per tensor).
    Returns: a report (tensors, shards, dtype).
    """
    if not choice.method.static:
        raise ConfigError(f"{choice.method.name!r} has per-task parts: merge into a pack instead")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PackError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    b = Checkpoint(base)
    fts = {t: Checkpoint(p) for t, p in models.items()}
    for ft in fts.values():
        if any(plan(b, ft, Options(progress=False)).values()):
            raise ConfigError(f"{ft.path}: grows a tensor of the base; not supported here")
    specs = [
        (n, dtype if dtype is not None and b.dtype(n).is_floating_point else b.dtype(n), b.shape(n))
        for n in b.names
    ]
    shards = _shards(specs, max_shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    with staged_dir(out) as stage:
        _write(stage, b, fts, choice, specs, files, shards, progress)
        _config(b.path, stage, dtype)
        copied = copy_side_files(b.path, stage) if b.path.is_dir() else []
    return {"tensors": len(specs), "shards": files, "dtype": str(dtype or "base"), "copied": copied}


def _write(
    stage: Path,
    b: Checkpoint,
    fts: dict[str, Checkpoint],
    choice: MethodChoice,
    specs: list[tuple[str, torch.dtype, tuple]],
    files: list[str],
    shards: list[list[int]],
    progress: Callable[[Iterable], Iterable],
) -> None:
    """Every shard, streamed: its header, then each tensor as it is merged."""
    depths = [d for n in b.names if (d := layer_index(n)) is not None]
    n_layers = max(depths) + 1 if depths else 1
    bar = iter(progress(range(len(specs))))
    weight_map = {}
    for fname, idx in zip(files, shards, strict=True):
        part = [specs[i] for i in idx]
        dtypes = {n: dt for n, dt, _ in part}
        with open(stage / fname, "wb") as f:
            for n in write_header(f, part, {"format": "pt"}):
                dt = dtypes[n]
                if dt.is_floating_point:
                    w = _merged_tensor(n, b, fts, choice, n_layers)
                else:
                    w = b.get(n)
                write_tensor(f, w.to(dt))
                weight_map[n] = fname
                next(bar, None)
    if len(files) > 1:
        total = sum(math.prod(s) * dt.itemsize for _, dt, s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _config(base: Path, out: Path, dtype: torch.dtype | None) -> None:
    src = base / "config.json" if base.is_dir() else None
    if src is None or not src.is_file():
        return
    cfg = json.loads(src.read_text())
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
