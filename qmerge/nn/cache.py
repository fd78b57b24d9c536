"""A byte-bounded LRU cache of merged weights (the materialized path), shared by every layer of
one patched model and safe to use from many threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from torch import Tensor


class MergedCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, build: Callable[[], Tensor]) -> Tensor:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return t
            self.misses += 1
        t = build()  # outside the lock: other layers and threads keep going
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return t
        with self._lock:
            if key in self._items:
                return self._items[key]
            while self.bytes + size > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
                self.evictions += 1
            self._items[key] = t
            self.bytes += size
        return t

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "entries": len(self._items),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
