"""Model checkpoints as qmerge reads them: a lazy name -> tensor map over one or more files.

Accepted inputs (a path to a file or a Hugging Face model directory):
- a `*.safetensors` file, or a directory with `model.safetensors`, a sharded set with its
  `model.safetensors.index.json`, or any set of `*.safetensors` files with disjoint names;
- `pytorch_model.bin` (and its sharded index) only through `torch.load(weights_only=True)`,
  which refuses anything but tensors and plain containers: no pickle code ever runs.

Tensors are returned memory-mapped from the files, so walking a checkpoint tensor by tensor
keeps process memory near one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from qmerge.errors import CheckpointError
from qmerge.format.names import alignment
from qmerge.format.safetensors_io import SafetensorsFile, tensor_sha256

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot load with torch.load(weights_only=True): {first}"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: is not a flat map of tensor names to tensors")
    return obj


class Checkpoint:
    """The tensors of one model, read lazily. `names` are sorted."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, SafetensorsFile | dict[str, Tensor]] = {}
        for f in self._files():
            src: SafetensorsFile | dict[str, Tensor]
            if f.suffix == ".safetensors":
                src = SafetensorsFile(f, error=CheckpointError)
                keys = src.keys()
            else:
                src = _load_bin(f)
                keys = list(src)
            for k in keys:
                if k in self._where:
                    raise CheckpointError(
                        f"{self.path}: tensor '{k}' appears in more than one "
                        f"file (second: {f.name})"
                    )
                self._where[k] = src
        if not self._where:
            raise CheckpointError(f"{self.path}: holds no tensors")
        self.names: list[str] = sorted(self._where)
        self._stored: dict[str, str] = {}  # name -> the name it has in its file (aligned)
        self.alignment = "identity"

    def align_to(self, reference: Iterable[str]) -> Checkpoint:
        """Renames tensors to the reference's spelling where they differ by a model prefix
        (format/names.py), e.g. a task model's 'bert.encoder...' to a base's 'encoder...'."""
        how, rename = alignment(self.names, reference)
        if how == "identity":
            return self
        where: dict[str, SafetensorsFile | dict[str, Tensor]] = {}
        stored: dict[str, str] = {}
        for n, src in self._where.items():
            new = rename(n)
            if new in where:
                raise CheckpointError(
                    f"{self.path}: tensors '{stored[new]}' and '{n}' both map to '{new}' ({how})"
                )
            where[new], stored[new] = src, self._stored.get(n, n)
        self._where, self._stored, self.alignment = where, stored, how
        self.names = sorted(where)
        return self

    def _files(self) -> list[Path]:
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")
        if p.is_file():
            if p.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
                raise CheckpointError(
                    f"{p}: not a checkpoint file (expected .safetensors, or "
                    f".bin/.pt read with weights_only=True)"
                )
            return [p]
        for index in INDEX_FILES:
            if (p / index).is_file():
                try:
                    weight_map = json.loads((p / index).read_text())["weight_map"]
                    shards = sorted(set(weight_map.values()))
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{p / index}: not a valid index ({e})") from None
                for s in shards:
                    if not isinstance(s, str) or Path(s).name != s or not (p / s).is_file():
                        raise CheckpointError(f"{p / index}: shard {s!r} is missing")
                return [p / s for s in shards]
        found = sorted(p.glob("*.safetensors"))
        if found:
            return found
        for name in ("pytorch_model.bin", "model.pt"):
            if (p / name).is_file():
                return [p / name]
        raise CheckpointError(
            f"{p}: no weights found (looked for *.safetensors, "
            f"model.safetensors.index.json, pytorch_model.bin)"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self.names)

    def get(self, name: str) -> Tensor:
        src, name = self._where[name], self._stored.get(name, name)
        return src.get(name) if isinstance(src, SafetensorsFile) else src[name]

    def shape(self, name: str) -> tuple[int, ...]:
        src, name = self._where[name], self._stored.get(name, name)
        return src.shape(name) if isinstance(src, SafetensorsFile) else tuple(src[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        src, name = self._where[name], self._stored.get(name, name)
        return src.dtype(name) if isinstance(src, SafetensorsFile) else src[name].dtype

    def file_of(self, name: str) -> Path | None:
        """The safetensors file (shard) that holds a tensor; None for a .bin checkpoint."""
        src = self._where[name]
        return src.path if isinstance(src, SafetensorsFile) else None

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def numel(self) -> int:
        total = 0
        for n in self.names:
            size = 1
            for d in self.shape(n):
                size *= d
            total += size
        return total

    def digest(self, name: str) -> str:
        return tensor_sha256(self.get(name))
