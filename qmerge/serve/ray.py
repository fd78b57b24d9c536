"""`qmerge serve --ray`: qmerge's engine as a Ray Serve application, for more traffic than one
process answers and more packs (or bases) than one process holds.

    ingress (ray_ingress.py)  HTTP: the body limit, which pack a request names, the relay;
                              /health, /metrics and /v1/models over every replica
    model   (ray_replica.py)  N replicas (or autoscaled), each qmerge's engine and scheduler
                              with every task of its packs: tasks share one batch
    registry                  an actor the replicas report to every second

On one machine `serve(packs)` starts a local Ray; on a cluster, `address="auto"` joins the
one `ray start --head` started. In Python:

    from qmerge.serve.ray import PackSpec, RayOptions, RayServer
    with RayServer([PackSpec("chat", "pack", "base")], RayOptions(replicas=2)) as s:
        httpx.post(s.url + "/v1/completions", json={"model": "math", "prompt": "2+2="})

`@serve.batch` is not used on purpose: Ray splits its batches by model id, which would stop
tasks from sharing a batch; each replica's own scheduler forms the batches.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from qmerge.errors import ConfigError
from qmerge.serve.ray_ingress import IngressBase, IngressConfig, Registry
from qmerge.serve.ray_replica import PackSpec, ReplicaConfig, replica_class
from qmerge.serve.state import Limits

__all__ = ["PackSpec", "RayOptions", "RayServer", "build", "serve"]
APP = "qmerge"
# A local Ray started here runs Serve's control loop at 2 Hz and exports its routers' metrics
# once a second (defaults: 10 Hz and 10 Hz): the same cores run the model, and at the defaults
# an idle application took 13% of a core (bench/results/serve-ray-notes.md). A cluster joined
# with `address` keeps its own settings; any variable already set wins.
QUIET = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1  # fixed replica count, unless max_replicas is set (autoscaling)
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling: in-flight requests per replica
    threads: int | None = None  # torch threads (and Ray CPUs) per replica; default: 1
    max_packs: int = 2  # packs a replica holds besides the default one
    limits: Limits = field(default_factory=Limits)
    dtype: str | None = None
    mode: str = "auto"

    def check(self) -> None:
        if self.replicas < 1 or self.min_replicas < 0 or self.max_packs < 1:
            raise ConfigError("--replicas and --max-packs must be >= 1, --min-replicas >= 0")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ConfigError("--max-replicas must be >= --min-replicas and >= 1")


def _check_packs(packs: list[PackSpec]) -> None:
    if not packs:
        raise ConfigError("give at least one pack to serve")
    names = [p.name for p in packs]
    for p in packs:
        if not p.name or "/" in p.name:
            raise ConfigError(f"pack name {p.name!r}: give a non-empty name without '/'")
        for what, path in (("pack", p.pack), ("base", p.base)):
            if not os.path.isdir(path):
                raise ConfigError(f"pack {p.name!r}: {what} {path} is not a directory")
    if len(set(names)) != len(names):
        raise ConfigError(f"pack names must differ: {names}")


def build(packs: list[PackSpec], options: RayOptions, registry: str):
    """The Serve application: the ingress bound to the model deployment."""
    from ray import serve

    _check_packs(packs)
    options.check()
    threads = options.threads or 1
    cfg = ReplicaConfig(
        tuple(packs), options.limits, options.dtype, options.mode, threads, registry
    )
    scaling: dict = {"num_replicas": options.replicas}
    if options.max_replicas is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": options.target_ongoing_requests,
            }
        }
    limits = options.limits
    model = serve.deployment(
        replica_class(options.max_packs),
        name="Model",
        ray_actor_options={"num_cpus": threads},
        # Each replica's scheduler queues and batches; Ray must not hold requests back.
        max_ongoing_requests=limits.max_queue + limits.max_batch,
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
        **scaling,
    )
    ingress = serve.deployment(
        IngressBase,
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4096,
    )
    icfg = IngressConfig(tuple(p.name for p in packs), limits.max_request_bytes, registry)
    return ingress.bind(model.bind(cfg), icfg)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RayServer:
    """The application on Ray Serve: started (or joined to `address`) on enter, shut down on
    exit. `url` is its HTTP address."""

    def __init__(
        self,
        packs: list[PackSpec],
        options: RayOptions | None = None,
        *,
        address: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        num_cpus: int | None = None,
    ):
        self.packs, self.options = packs, options or RayOptions()
        self.address, self.host, self.num_cpus = address, host, num_cpus
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.registry = f"qmerge-registry-{uuid.uuid4().hex[:8]}"
        self._actor = None
        self._own_ray = False

    def start(self, timeout: float = 300) -> RayServer:
        import ray
        from ray import serve

        _check_packs(self.packs)
        self.options.check()
        if not ray.is_initialized():
            if not self.address:
                for k, v in QUIET.items():  # the Ray processes inherit them
                    os.environ.setdefault(k, v)
            kw: dict = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
            ray.init(
                namespace="qmerge",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                **kw,
            )
            self._own_ray = True
        self._actor = (
            ray.remote(Registry)
            .options(name=self.registry, namespace="qmerge", num_cpus=0)
            .remote()
        )
        serve.start(http_options={"host": self.host, "port": self.port})
        app = build(self.packs, self.options, self.registry)
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        """Until the application is running and every replica has reported."""
        import httpx
        from ray import serve

        end = time.monotonic() + timeout
        want = self.options.min_replicas if self.options.max_replicas else self.options.replicas
        while time.monotonic() < end:
            status = serve.status().applications.get(APP)
            if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
                raise ConfigError(f"the Ray Serve application failed: {status.message}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and len(r.json()["replicas"]) >= want:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ConfigError(f"the Ray Serve application did not start within {timeout:g} s")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            serve.delete(APP)
            if self._own_ray:  # on a cluster joined, other applications keep their Serve
                serve.shutdown()
        finally:
            if self._actor is not None:
                ray.kill(self._actor)
            if self._own_ray:
                ray.shutdown()

    def __enter__(self) -> RayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    packs: list[PackSpec],
    options: RayOptions | None = None,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serves until interrupted (the CLI verb's `--ray`)."""
    server = RayServer(packs, options, address=address, host=host, port=port)
    try:
        server.start()
        names = ", ".join(p.name for p in packs)
        print(f"qmerge: serving {names} on Ray Serve at {server.url}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("qmerge: shutting down the application", file=sys.stderr, flush=True)
    finally:
        # a second Ctrl-C while Ray shuts down must not leave the application running
        with _sigint_ignored():
            server.stop()


@contextmanager
def _sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
