"""The scheduler-to-handler mailbox: every event arrives, in order per queue, and a burst posted
from another thread wakes the event loop once, not once per event."""

from __future__ import annotations

import asyncio
import threading

from qmerge.serve.mailbox import Mailbox


def test_a_burst_from_another_thread_arrives_in_order_with_one_wakeup():
    async def main():
        loop = asyncio.get_running_loop()
        box = Mailbox(loop)
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*a, **kw):
            nonlocal wakeups
            wakeups += 1
            return real(*a, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        qs = [asyncio.Queue(), asyncio.Queue()]

        def scheduler():  # one decoding step: an event per sequence, two requests
            for k in range(64):
                box.post(qs[k % 2], k)

        t = threading.Thread(target=scheduler)
        t.start()
        t.join()  # the loop has not run yet: the whole burst waits for one delivery
        got = [[await q.get() for _ in range(32)] for q in qs]
        assert got == [list(range(0, 64, 2)), list(range(1, 64, 2))]
        assert wakeups == 1
        box.post(qs[0], "after")  # empty again: the next post schedules a new delivery
        assert await qs[0].get() == "after" and wakeups == 2

    asyncio.run(main())
