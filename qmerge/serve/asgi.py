"""Calling an ASGI application in this process without a socket: a request given as method,
path, query, headers and body, its response returned as a head (status, headers) and then its
body chunks as they are sent. A Ray Serve replica (serve/ray_replica.py) answers every request
so, with the very app `qmerge serve` runs (app.py): one protocol and one set of handlers.

Closing the generator before the response ends is the client's disconnect: the app's next
`receive()` returns `http.disconnect` (the app cancels the request's jobs), and its task is
cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Head:
    status: int
    headers: tuple[tuple[str, str], ...]


def _scope(call: Call) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.path.encode(),
        "query_string": call.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in call.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def call_app(app, call: Call) -> AsyncIterator[Head | bytes]:
    """Yields the response's Head, then its body chunks (bytes) until the body ends."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            await sent.put(None)  # the app returned (or raised): no more messages

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                await task  # re-raises what the app raised
                raise RuntimeError(f"{call.method} {call.path}: the app sent no complete response")
            if message["type"] == "http.response.start":
                headers = tuple((k.decode(), v.decode()) for k, v in message.get("headers", ()))
                yield Head(message["status"], headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
