"""Events from the scheduler thread to a request handler's event loop, delivered in batches.

The scheduler emits one event per token per sequence: 32 running sequences make 32 events a
decoding step. Posting each with `call_soon_threadsafe` wakes the event loop 32 times a step,
and every wakeup takes the GIL and a core from the model's threads (the server shares the
machine's cores with them). A mailbox schedules one delivery when it goes from empty to
non-empty; everything posted until that delivery runs goes with it, in order.
"""

from __future__ import annotations

import asyncio
import threading


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []

    def post(self, q: asyncio.Queue, item: object) -> None:
        """Queues `item` for `q` (any thread); the loop puts it there on its next delivery."""
        with self._lock:
            self._items.append((q, item))
            if len(self._items) > 1:  # a delivery is already scheduled
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for q, item in items:
            q.put_nowait(item)
