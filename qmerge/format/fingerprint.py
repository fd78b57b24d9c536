"""The base model's fingerprint: what a pack records about the base it was made from.

- `tensors`: every base tensor's dtype, shape and sha256 (of dtype, shape and bytes);
- `structure`: sha256 over the sorted (name, dtype, shape) list, layout independent;
- `content`: sha256 over the sorted (name, tensor sha256) list.

Sharding, file order and file format do not change it; a changed byte in any tensor does. A
mismatch is reported by naming the first tensor that differs, not just two hashes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable

import torch

from qmerge.errors import BaseMismatchError
from qmerge.format.safetensors_io import dtype_name

TensorInfo = dict  # {"dtype": "F32", "shape": [...], "sha256": hex}


def fingerprint(items: Iterable[tuple[str, torch.dtype, tuple[int, ...], str]]) -> dict:
    """items: (name, dtype, shape, tensor sha256) for every base tensor."""
    tensors = {
        name: {"dtype": dtype_name(dtype), "shape": list(shape), "sha256": digest}
        for name, dtype, shape, digest in items
    }
    names = sorted(tensors)
    structure = [[n, tensors[n]["dtype"], tensors[n]["shape"]] for n in names]
    content = [[n, tensors[n]["sha256"]] for n in names]
    return {
        "structure": hashlib.sha256(json.dumps(structure).encode()).hexdigest(),
        "content": hashlib.sha256(json.dumps(content).encode()).hexdigest(),
        "tensors": {n: tensors[n] for n in names},
    }


def checkpoint_fingerprint(ckpt, progress: Callable[[Iterable], Iterable] = iter) -> dict:
    """Fingerprint of a `Checkpoint` (reads every byte once, memory-mapped)."""
    return fingerprint(
        (n, ckpt.dtype(n), ckpt.shape(n), ckpt.digest(n)) for n in progress(ckpt.names)
    )


def compare(expected: dict, actual: dict, what: str) -> None:
    """Raises BaseMismatchError naming the first tensor where `actual` differs from `expected`."""
    if expected["content"] == actual["content"] and expected["structure"] == actual["structure"]:
        return
    exp, act = expected["tensors"], actual["tensors"]
    missing = sorted(set(exp) - set(act))
    extra = sorted(set(act) - set(exp))
    if missing:
        raise BaseMismatchError(
            f"{what}: the base has no tensor '{missing[0]}' that the pack's "
            f"base had ({len(missing)} missing); this is a different base"
        )
    if extra:
        raise BaseMismatchError(
            f"{what}: the base has tensor '{extra[0]}' that the pack's base "
            f"did not ({len(extra)} extra); this is a different base"
        )
    for n in sorted(exp):
        e, a = exp[n], act[n]
        if (e["dtype"], e["shape"]) != (a["dtype"], a["shape"]):
            raise BaseMismatchError(
                f"{what}: base tensor '{n}' is {a['dtype']} {a['shape']}, the pack's base had "
                f"{e['dtype']} {e['shape']}; this is a different base"
            )
        if e["sha256"] != a["sha256"]:
            raise BaseMismatchError(
                f"{what}: base tensor '{n}' has different values from the pack's base "
                f"(sha256 {a['sha256'][:12]} vs {e['sha256'][:12]}); this is a different base"
            )
    raise BaseMismatchError(f"{what}: the base's fingerprint differs from the pack's")
