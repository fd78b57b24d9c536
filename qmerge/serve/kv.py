"""The KV cache of a running batch whose sequences join and leave between decoding steps
(iteration-level batching).

Every sequence is left-padded to the batch's length `L`: row b holds its `lens[b]` real
positions at the right end, so one new token per row is one column more for all of them.
Joining two batches pads the shorter on the left; dropping rows trims columns no row uses any
more. Positions are per row (`lens`), so a sequence's rotary positions never see the padding:
its logits are those of the same sequence decoded alone, up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KV:
    keys: list[Tensor]  # per layer [B, H, L, D]
    values: list[Tensor]
    lens: Tensor  # [B] int64: real positions per row (the rest is left padding)

    @property
    def batch(self) -> int:
        return int(self.lens.shape[0])

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    @classmethod
    def from_cache(cls, cache, lens: Tensor) -> KV:
        """From a transformers DynamicCache after a forward over left-padded rows."""
        keys, values = [], []
        for layer in cache.layers:
            keys.append(layer.keys)
            values.append(layer.values)
        return cls(keys, values, lens.clone())

    def to_cache(self, config):
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=list(zip(self.keys, self.values, strict=True)), config=config
        )

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
            [k.index_select(0, idx)[:, :, start:] for k in self.keys],
            [v.index_select(0, idx)[:, :, start:] for v in self.values],
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
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def _pad(t: Tensor, n: int) -> Tensor:
    if t.shape[2] == n:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], n - t.shape[2], t.shape[3])
    return torch.cat([pad, t], dim=2)
