"""Serving a pack over HTTP (shared/DESIGN.md, "Layers": an entry point beside the CLI).

    app.py        the API: OpenAI completions and chat, /v1/classify, models, health, metrics
    protocol.py   request and response bodies (the OpenAPI spec)
    scheduler.py  the thread that batches requests of different tasks into one forward
    engine.py     the patched model: prefill, one decoding step, classify, pack reloads
    kv.py         the KV cache of a batch whose sequences join and leave
    sequence.py   one generation: sampling, stop strings, released text
    metrics.py    Prometheus counters and histograms
    server.py     `serve` (the CLI verb) and `Server` (a background thread, for tests)
    asgi.py       calling the app in process (a Ray Serve replica answers with it)
    ray.py        `serve --ray`: the app on Ray Serve (ray_ingress.py, ray_replica.py)

Needs fastapi and uvicorn (ray.py: ray[serve]); nothing else in qmerge imports this package.
"""

from qmerge.serve.app import Limits, create_app
from qmerge.serve.server import Server, serve

__all__ = ["Limits", "Server", "create_app", "serve"]
