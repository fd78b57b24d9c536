"""The model deployment of `qmerge serve --ray` (serve/ray.py): each replica runs qmerge's own
engine and scheduler, so requests of different tasks of a pack share one batch.

A replica holds the default pack for its whole life (every replica can answer its tasks) and
loads other packs on demand through `@serve.multiplexed`, keyed by pack: Ray routes a request
for pack P to a replica that already holds P, and evicts the least recently used pack past
`max_packs`. Every request is answered by the app `qmerge serve` runs (app.py), called in
process (asgi.py): the same protocol, limits, errors and hot reload (each replica's scheduler
watches its pack on disk).

Every second a replica reports to the registry actor (ray_registry.py) what it holds: the
packs, their tasks, queue depths and metrics; the ingress answers /health and /metrics from
those reports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qmerge.dtypes import FLOAT_DTYPES
from qmerge.serve import protocol as P
from qmerge.serve.app import create_app
from qmerge.serve.asgi import Call, Head, call_app
from qmerge.serve.engine import Engine
from qmerge.serve.state import Limits

log = logging.getLogger("qmerge.serve")


@dataclass(frozen=True)
class PackSpec:
    """A served pack: its public name (models are 'name/task'), its directory and its base's."""

    name: str
    pack: str
    base: str


@dataclass(frozen=True)
class ReplicaConfig:
    packs: tuple[PackSpec, ...]  # the first is the default pack, held by every replica
    limits: Limits = field(default_factory=Limits)
    dtype: str | None = None  # a key of qmerge.dtypes.FLOAT_DTYPES
    mode: str = "auto"
    threads: int | None = None  # torch threads per replica
    registry: str = ""  # the registry actor's name (namespace "qmerge")
    report_s: float = 1.0


class Local:
    """One pack in this replica: its engine, its app, and a thread of its own that loads the
    model and then runs the scheduler (torch's CPU pool then has one owner, as in `qmerge
    serve`: scheduler.py)."""

    def __init__(self, spec: PackSpec, cfg: ReplicaConfig):
        self.spec = spec
        ready = threading.Event()
        box: dict = {}

        def main() -> None:
            try:
                engine = Engine(
                    spec.pack,
                    spec.base,
                    dtype=FLOAT_DTYPES.get(cfg.dtype or ""),
                    mode=cfg.mode,
                    threads=cfg.threads,
                )
                box["app"] = create_app(engine, cfg.limits, name=spec.name, scheduler_thread=False)
            except BaseException as e:  # noqa: BLE001 - raised again in the constructor
                box["error"] = e
                return
            finally:
                ready.set()
            box["app"].state.scheduler.run()

        self._thread = threading.Thread(target=main, name=f"qmerge-{spec.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if "error" in box:
            raise box["error"]
        self.app = box["app"]

    def info(self) -> dict:
        s = self.app.state.qmerge
        return {
            "kind": s.engine.kind,
            "tasks": list(s.engine.tasks),
            "queue_depth": s.sched.queue.qsize(),
            "running": len(s.sched.active),
            "status": "down"
            if not s.sched.alive()
            else "degraded"
            if s.engine.reload_error
            else "ok",
            "reload_error": s.engine.reload_error,
        }

    def metrics(self) -> str:
        return self.app.state.metrics.render()

    def alive(self) -> bool:
        """False once stopped (an evicted pack's thread has ended)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self.app.state.scheduler.stop()
        self._thread.join(timeout=30)

    def __del__(self) -> None:  # Ray Serve calls it when it evicts the pack
        try:
            self.stop()
        except Exception:  # interpreter shutdown
            pass


class ReplicaBase:
    """The deployment's body; `replica_class` adds the multiplexed loader."""

    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.specs = {p.name: p for p in cfg.packs}
        self.default = Local(cfg.packs[0], cfg)
        self.extra: dict[str, Local] = {}  # the other packs held now (for reports)
        self.id = _replica_id()
        self._stop = threading.Event()
        if cfg.registry:
            threading.Thread(target=self._report_loop, name="qmerge-report", daemon=True).start()

    async def _load(self, name: str) -> Local:
        spec = self.specs.get(name)
        if spec is None:  # the ingress only sends known names
            raise KeyError(f"no pack named {name!r} in this application")
        local = await asyncio.to_thread(Local, spec, self.cfg)
        self.extra[name] = local
        return local

    async def forward(self, call: Call) -> AsyncIterator[Head | bytes]:
        """Answers one HTTP request with the pack the request's multiplexed id names (the
        default pack when none)."""
        from ray import serve

        name = serve.get_multiplexed_model_id()
        try:
            local = self.default if not name else await self.pack(name)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - answered, and the next request tries again
            log.exception("pack %r could not be loaded", name)
            yield Head(503, (("content-type", "application/json"), ("retry-after", "5")))
            yield json.dumps(P.error(503, f"pack {name!r} could not be loaded: {e}")).encode()
            return
        async for item in call_app(local.app, call):
            yield item

    def report(self) -> dict:
        held = {self.default.spec.name: self.default}
        for name, local in list(self.extra.items()):
            if local.alive():
                held[name] = local
            else:
                self.extra.pop(name, None)
        return {
            "replica": self.id,
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "packs": {n: loc.info() for n, loc in held.items()},
            "metrics": {n: loc.metrics() for n, loc in held.items()},
            "at": time.time(),
        }

    def _report_loop(self) -> None:
        import ray

        registry = None
        while not self._stop.wait(self.cfg.report_s if registry else 0.05):
            try:
                if registry is None:
                    registry = ray.get_actor(self.cfg.registry, namespace="qmerge")
                registry.report.remote(self.report())
            except Exception as e:  # the registry restarts with the driver; keep serving
                log.debug("report failed: %s", e)
                registry = None

    def __del__(self) -> None:
        self._stop.set()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def replica_class(max_packs: int) -> type:
    """The deployment class, holding at most `max_packs` packs besides the default one."""
    from ray import serve

    class Replica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max(1, max_packs))
        async def pack(self, name: str) -> Local:
            return await self._load(name)

    return Replica
