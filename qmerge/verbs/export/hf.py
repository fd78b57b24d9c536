"""The `hf` format: a Hugging Face model directory that `AutoModel*.from_pretrained` loads with
no qmerge installed. Merged weights (the task's or mixture's, plus its head) in safetensors,
sharded above `max_shard_bytes` with a `model.safetensors.index.json`; config.json written for
the target class; tokenizer and generation files copied from the base.

Tensors are computed and written one shard at a time: memory holds one shard, not the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from qmerge.format.safetensors_io import write_safetensors
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.target import copy_side_files

INDEX = "model.safetensors.index.json"


def tensors(job: Job) -> Iterable[tuple[str, str, Callable[[], Tensor]]]:
    """(pack name, written name, make fp32 tensor) for everything the target holds."""
    for src, dst in sorted(job.target.names.items(), key=lambda kv: kv[1]):
        yield src, dst, lambda s=src: job.tensor(s)


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()


def write_config(job: Job, out: Path, **extra) -> None:
    config = dict(job.target.config, dtype=str(job.dtype).removeprefix("torch."), **extra)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write(job: Job, out: Path) -> dict:
    """Writes the model directory into `out` (an empty staging directory)."""
    base, head, dtype = job.checkpoint, job.head, job.dtype
    items = list(tensors(job))
    sizes = []
    for src, _dst, _ in items:
        if src in head:
            sizes.append(_nbytes(head[src].shape, dtype))
        else:
            dt = dtype if base.dtype(src).is_floating_point else base.dtype(src)
            sizes.append(_nbytes(base.shape(src), dt))
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > job.max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    bar = iter(job.progress(range(len(items))))
    for fname, idx in zip(names, shards, strict=True):
        chunk = {}
        for i in idx:
            _src, dst, make = items[i]
            chunk[dst] = cast(make(), dtype)
            weight_map[dst] = fname
            next(bar, None)
        with open(out / fname, "wb") as f:
            write_safetensors(f, chunk, metadata={"format": "pt"})
        del chunk
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    write_config(job, out)
    copied = copy_side_files(job.base, out)
    return {"shards": names, "tensors": len(items), "copied": copied}
