"""The KV cache of a running batch whose sequences join and leave between decoding steps
(iteration-level batching).

Every sequence is left-padded to the batch's length `L`: row b holds its `lens[b]` real
positions at the right end, so one new token per row is one column more for all of them.
Joining two batches pads the shorter on the left; dropping rows trims columns no row uses any
more. Positions are per row (`lens`), so a sequence's rotary positions never see the padding:
its logits are those of the same sequence decoded alone, up to float summation order.

Each layer's keys and values are views of buffers with room on the right: a decoding step
writes its column in place (`_Growing`), where transformers' own layer copies the whole cache
twice per step (`torch.cat` in building the cache and in its update): 5 % of the CPU time of
bench/serve.py's 32-client run (bench/results/serve-notes.md). A batch made by `join` or
`select` is exact-sized and gets its room at its first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 32  # columns of room a buffer gets when it grows (at least; half its length when longer)


@dataclass
class KV:
    keys: list[Tensor]  # per layer [B, H, L, D], views of `_kbuf`'s first L columns
    values: list[Tensor]
    lens: Tensor  # [B] int64: real positions per row (the rest is left padding)
    _kbuf: list[Tensor] | None = field(default=None, repr=False)  # [B, H, L + room, D]
    _vbuf: list[Tensor] | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return int(self.lens.shape[0])

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    @classmethod
    def from_cache(cls, cache, lens: Tensor) -> KV:
        """From a transformers cache after a forward over left-padded rows."""
        keys, values, kbuf, vbuf = [], [], [], []
        for layer in cache.layers:
            keys.append(layer.keys)
            values.append(layer.values)
            kbuf.append(getattr(layer, "kbuf", layer.keys))
            vbuf.append(getattr(layer, "vbuf", layer.values))
        return cls(keys, values, lens.clone(), kbuf, vbuf)

    def to_cache(self, config):
        """A transformers cache over these tensors (no copy). Full-attention layers append in
        place; other kinds (sliding windows) take the library's own layer."""
        cache = DynamicCache(config=config)
        kbuf = self._kbuf or self.keys
        vbuf = self._vbuf or self.values
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                cache.layers[i] = _Growing(self.keys[i], self.values[i], kbuf[i], vbuf[i])
            else:
                layer.update(self.keys[i], self.values[i])
        return cache

    def mask(self, extra: int = 0) -> Tensor:
        """attention_mask [B, L + extra]: 1 for real positions (and the `extra` new ones)."""
        cols = torch.arange(self.length + extra)
        return (cols[None, :] >= (self.length - self.lens)[:, None]).long()

    def select(self, rows: list[int]) -> KV:
        """The rows kept, with the left columns no kept row uses trimmed away."""
        idx = torch.tensor(rows, dtype=torch.int64)
        lens = self.lens[idx]
        start = self.length - int(lens.max()) if rows else self.length
        return KV(
            [k[:, :, start:].index_select(0, idx) for k in self.keys],
            [v[:, :, start:].index_select(0, idx) for v in self.values],
            lens,
        )

    def join(self, other: KV) -> KV:
        """This batch's rows, then `other`'s, padded on the left to one length."""
        n = max(self.length, other.length)
        return KV(
            [
                torch.cat([_pad(a, n), _pad(b, n)])
                for a, b in zip(self.keys, other.keys, strict=True)
            ],
            [
                torch.cat([_pad(a, n), _pad(b, n)])
                for a, b in zip(self.values, other.values, strict=True)
            ],
            torch.cat([self.lens, other.lens]),
        )

    def nbytes(self) -> int:
        """Bytes held, room included."""
        bufs = (*(self._kbuf or self.keys), *(self._vbuf or self.values))
        return sum(t.numel() * t.element_size() for t in bufs)


def _pad(t: Tensor, n: int) -> Tensor:
    if t.shape[2] == n:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n - t.shape[2], t.shape[3])
    return torch.cat([pad, t], dim=2)


class _Growing(DynamicLayer):
    """A full-attention cache layer whose keys and values are the first columns of buffers
    with room: `update` writes the new columns in place, and grows the buffers (one copy) only
    when the room runs out."""

    def __init__(self, keys: Tensor, values: Tensor, kbuf: Tensor, vbuf: Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.kbuf, self.vbuf = keys, values, kbuf, vbuf
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        n, m = self.keys.shape[2], key_states.shape[2]
        if n + m > self.kbuf.shape[2]:
            self.kbuf = _grown(self.keys, n + m)
            self.vbuf = _grown(self.values, n + m)
        self.kbuf[:, :, n : n + m] = key_states
        self.vbuf[:, :, n : n + m] = value_states
        self.keys, self.values = self.kbuf[:, :, : n + m], self.vbuf[:, :, : n + m]
        return self.keys, self.values


def _grown(t: Tensor, need: int) -> Tensor:
    """A buffer of `need` columns and room after them, starting with `t`'s columns."""
    b, h, n, d = t.shape
    buf = t.new_empty(b, h, need + max(ROOM, need // 2), d)
    buf[:, :, :n] = t
    return buf
