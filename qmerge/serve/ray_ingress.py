"""The ingress deployment of `qmerge serve --ray` (serve/ray.py), and the registry actor the
model replicas report to.

The ingress does no model work. For each request it
  - refuses a body over the limit (413, as `qmerge serve`);
  - reads `model` from a JSON body: 'pack/task' (or 'pack/a:0.7+b:0.3') of a pack other than
    the default goes to a replica holding that pack (Ray Serve's multiplexing, keyed by pack);
    anything else, malformed bodies included, to any replica, whose app answers it exactly as
    `qmerge serve` would;
  - relays the answer: server-sent events as they come, other bodies once complete.
A replica that dies with a request in flight: a request whose answer has not started is sent
once more (to another replica, or the restarted one); otherwise, or when the second try fails
too, the client gets 503 (or, mid-stream, an error event) and may retry.

GET /health, /metrics and /v1/models are the ingress's own: the replicas' reports (packs,
tasks, queue depths, metrics labelled by replica and pack) and the tasks of every pack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qmerge.serve import protocol as P
from qmerge.serve.asgi import Call, Head

log = logging.getLogger("qmerge.serve")
STALE_S = 5.0  # a replica silent this long is left out of /health (dead, or restarting)


class Registry:
    """What each model replica last reported (a Ray actor: ray.remote(Registry))."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}

    def report(self, info: dict) -> None:
        self.reports[info["replica"]] = info

    def snapshot(self) -> list[dict]:
        now = time.time()
        for k in [k for k, v in self.reports.items() if now - v["at"] > 10 * STALE_S]:
            del self.reports[k]
        return sorted(self.reports.values(), key=lambda r: r["replica"])


@dataclass(frozen=True)
class IngressConfig:
    packs: tuple[str, ...]  # pack names; the first is the default
    max_request_bytes: int
    registry: str


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(P.error(status, message), status_code=status, headers=headers)


def pack_of(body: bytes, packs: tuple[str, ...]) -> str | None:
    """The pack a request body's `model` names ('pack/task'), None for the default pack (and
    for bodies that are not JSON objects: the replica's app answers those)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(model, str) or "/" not in model:
        return None
    name = model.split("/", 1)[0]
    return name if name in packs[1:] else None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def merge_metrics(parts: list[tuple[dict, str]]) -> str:
    """Prometheus texts of several replicas and packs as one: each sample gains the labels of
    its part; every family's HELP and TYPE come once, before all its samples."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for labels, text in parts:
        extra = ",".join(f'{k}="{v}"' for k, v in labels.items())
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                family = line.split()[2]
                heads.setdefault(family, [])
                if line not in heads[family]:
                    heads[family].append(line)
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, inner, rest = m.group(1), (m.group(2) or "{}")[1:-1], m.group(3)
            joined = ",".join(x for x in (extra, inner) if x)
            samples.setdefault(family or name, []).append(f"{name}{{{joined}}}{rest}")
    out: list[str] = []
    for family in list(heads) + [f for f in samples if f not in heads]:
        out += heads.get(family, []) + samples.get(family, [])
    return "\n".join(out) + "\n"


def _is_dead_replica(e: BaseException) -> bool:
    from ray import exceptions as rx

    return isinstance(e, rx.RayActorError | rx.ActorUnavailableError)


class IngressBase:
    """The deployment's body (ray.py wraps it with serve.deployment)."""

    def __init__(self, model, cfg: IngressConfig):
        self.model = model.options(stream=True)
        self.cfg = cfg
        self.retried = 0
        self.failed = 0
        self._registry = None

    def registry(self):
        import ray

        if self._registry is None:
            self._registry = ray.get_actor(self.cfg.registry, namespace="qmerge")
        return self._registry

    async def __call__(self, request):
        from starlette.responses import PlainTextResponse

        path, method = request.url.path, request.method
        if method == "GET" and path == "/health":
            return await self.health()
        if method == "GET" and path == "/metrics":
            text = await self.metrics()
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")
        if method == "GET" and path == "/v1/models":
            return await self.models()
        body = await self._body(request)
        if not isinstance(body, bytes):
            return body  # the 413 answer
        headers = tuple((k, v) for k, v in request.headers.items() if k.lower() != "host")
        call = Call(method, path, request.url.query, headers, body)
        return await self.forward(call, pack_of(body, self.cfg.packs))

    async def _body(self, request):
        limit = self.cfg.max_request_bytes
        length = request.headers.get("content-length")
        too_large = f"request body over {limit} bytes (--max-request-bytes)"
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _error(413, too_large)
        chunks, seen = [], 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return _error(413, too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    def _send(self, call: Call, pack: str | None):
        handle = self.model if pack is None else self.model.options(multiplexed_model_id=pack)
        return handle.forward.remote(call)

    async def forward(self, call: Call, pack: str | None):
        for attempt in (0, 1):
            gen = self._send(call, pack)
            try:
                return await self._answer(gen)
            except asyncio.CancelledError:  # the client went away
                gen.cancel()
                raise
            except Exception as e:
                if not _is_dead_replica(e):  # a bug: answered like app.py's handler does
                    log.exception("%s %s failed", call.method, call.path)
                    return _error(500, f"internal error: {type(e).__name__}")
                log.warning(
                    "a replica died answering %s %s (try %d)", call.method, call.path, attempt
                )
                if attempt == 0:
                    self.retried += 1
        self.failed += 1
        return _error(503, "the replica answering this request died; it is being restarted, retry")

    async def _answer(self, gen):
        """The response of one try: relayed as it comes for a stream, else once complete."""
        from starlette.responses import Response, StreamingResponse

        head: Head = await gen.__anext__()
        if dict(head.headers).get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                self._relay(gen),
                status_code=head.status,
                headers=_keep(head.headers),
                media_type="text/event-stream",
            )
        body = b"".join([chunk async for chunk in gen])
        return Response(body, status_code=head.status, headers=_keep(head.headers))

    async def _relay(self, gen) -> AsyncIterator[bytes]:
        ended = False
        try:
            async for chunk in gen:
                yield chunk
            ended = True
        except Exception as e:
            if not _is_dead_replica(e):
                raise
            ended = True
            self.failed += 1
            err = P.error(503, "the replica answering this stream died; retry")
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            if not ended:  # the client went away: the replica's app cancels its jobs
                gen.cancel()

    async def _reports(self) -> list[dict]:
        reports = await self.registry().snapshot.remote()
        now = time.time()
        return [r for r in reports if now - r["at"] <= STALE_S]

    async def health(self):
        from starlette.responses import JSONResponse

        reps = await self._reports()
        body = {
            "status": "ok" if reps else "unavailable",
            "default_pack": self.cfg.packs[0],
            "packs": list(self.cfg.packs),
            "replicas": [{k: v for k, v in r.items() if k != "metrics"} for r in reps],
        }
        return JSONResponse(body, status_code=200 if reps else 503)

    async def metrics(self) -> str:
        parts = [
            ({"replica": r["replica"], "pack": pack}, text)
            for r in await self._reports()
            for pack, text in r["metrics"].items()
        ]
        own = (
            "# HELP qmerge_ray_retried_total Requests sent again after their replica died.\n"
            "# TYPE qmerge_ray_retried_total counter\n"
            f"qmerge_ray_retried_total {self.retried}\n"
            "# HELP qmerge_ray_failed_total Requests answered 503 because their replica died.\n"
            "# TYPE qmerge_ray_failed_total counter\n"
            f"qmerge_ray_failed_total {self.failed}\n"
        )
        return merge_metrics(parts) + own

    async def models(self):
        from starlette.responses import JSONResponse

        cards = []
        for i, pack in enumerate(self.cfg.packs):
            gen = self._send(Call("GET", "/v1/models"), None if i == 0 else pack)
            head = await gen.__anext__()
            body = json.loads(b"".join([c async for c in gen]))
            if head.status != 200:  # a pack that cannot be loaded: the others are listed
                log.warning("GET /v1/models: pack %r answered %d", pack, head.status)
                continue
            for card in body["data"]:
                card["id"] = card["id"] if i == 0 else f"{pack}/{card['id']}"
                card["pack"] = pack
                cards.append(card)
        return JSONResponse({"object": "list", "data": cards})


def _keep(headers: tuple[tuple[str, str], ...]) -> dict:
    """The app's response headers the relay can pass on (its own length and encoding differ)."""
    drop = {"content-length", "transfer-encoding", "connection"}
    return {k: v for k, v in headers if k.lower() not in drop}
