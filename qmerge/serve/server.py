"""Running the API: `serve` (the CLI verb, in the foreground) and `Server` (in a background
thread on a loopback port, for tests, benchmarks and notebooks).

    with Server(pack, base) as s:
        httpx.post(s.url + "/v1/completions", json={"model": "math", "prompt": "2+2="})
"""

from __future__ import annotations

import os
import socket
import threading
import time

import torch

from qmerge.errors import ConfigError
from qmerge.serve.app import Limits, create_app
from qmerge.serve.engine import Engine

PathLike = str | os.PathLike


def _app(
    pack: PathLike,
    base: PathLike,
    limits: Limits,
    dtype: torch.dtype | None,
    mode: str,
    threads: int | None,
    scheduler_thread: bool = True,
):
    engine = Engine(pack, base, dtype=dtype, mode=mode, threads=threads)
    return create_app(engine, limits, scheduler_thread=scheduler_thread)


def _config(app, host: str, port: int, log_level: str):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


def serve(
    pack: PathLike,
    base: PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    dtype: torch.dtype | None = None,
    mode: str = "auto",
    threads: int | None = None,
    log_level: str = "info",
) -> None:
    """Serves the pack over HTTP until interrupted. The model runs in this thread (where it
    was loaded), HTTP in a background thread."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "qmerge serve needs fastapi and uvicorn (pip install fastapi uvicorn)"
        ) from None
    app = _app(pack, base, limits or Limits(), dtype, mode, threads, scheduler_thread=False)
    server = uvicorn.Server(_config(app, host, port, log_level))
    http = threading.Thread(target=server.run, name="qmerge-http", daemon=True)
    http.start()
    sched = app.state.scheduler
    watcher = threading.Thread(target=_stop_with, args=(http, sched), daemon=True)
    watcher.start()
    try:
        sched.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    if not server.started:
        raise ConfigError(
            f"could not serve on {host}:{port} (is the port in use? see the log above)"
        )


def _stop_with(http: threading.Thread, sched) -> None:
    """Stops the scheduler when the HTTP server ends (a bind error, or shutdown)."""
    http.join()
    sched.stop()


class Server:
    """The API on 127.0.0.1 and a free port, served from a background thread."""

    def __init__(
        self,
        pack: PathLike,
        base: PathLike,
        limits: Limits | None = None,
        *,
        dtype: torch.dtype | None = None,
        mode: str = "auto",
        threads: int | None = None,
        log_level: str = "warning",
    ):
        import uvicorn

        self.app = _app(pack, base, limits or Limits(), dtype, mode, threads)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(_config(self.app, "127.0.0.1", self.port, log_level))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    def start(self, timeout: float = 60) -> Server:
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
