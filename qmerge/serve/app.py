"""The HTTP API (FastAPI) over a small app state (state.py): OpenAI-compatible completions and
chat completions with server-sent-event streaming (routes_generate.py), /v1/classify,
/v1/models, /health and /metrics (routes_info.py).

Routes are checked by the scheduler when it admits a job, against the tasks served at that
moment. Every error is an OpenAI-style body {"error": {"message", "type", "code"}} with a 4xx
status for bad input (400 malformed, 404 unknown task, 429 queue full, 504 timeout).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmerge.serve import protocol as P
from qmerge.serve import routes_generate, routes_info
from qmerge.serve.engine import Engine
from qmerge.serve.metrics import Metrics
from qmerge.serve.scheduler import Scheduler
from qmerge.serve.state import AppState, Limits, Refused
from qmerge.version import __version__

log = logging.getLogger("qmerge.serve")
__all__ = ["Limits", "Refused", "create_app"]


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(P.error(status, message), status_code=status, headers=headers)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return _error(400, f"{where}: {msg}" if where else msg)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Refused)
    async def _refused(_req: Request, exc: Refused):
        return _error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception):
        log.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before it is parsed,
    from its Content-Length, or once that many bytes of a chunked body have arrived."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(
            413, f"request body over {self.max_bytes} bytes (--max-request-bytes)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            exc = self._too_large()
            return await _error(exc.status_code, str(exc.detail))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()  # inside the app: its handler answers 413
            return message

        await self.app(scope, limited, send)


def create_app(
    engine: Engine,
    limits: Limits | None = None,
    *,
    metrics: Metrics | None = None,
    scheduler: Scheduler | None = None,
    scheduler_thread: bool = True,
    name: str | None = None,
) -> FastAPI:
    """The API over `engine`. With scheduler_thread=False the caller runs
    `app.state.scheduler.run()` itself (in the thread that loaded the model: server.py).
    `name`: the pack's public name, under which a model 'name/task' is the task 'task'."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    sched = scheduler or Scheduler(
        engine,
        metrics,
        max_batch=limits.max_batch,
        window_ms=limits.window_ms,
        max_queue=limits.max_queue,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if scheduler_thread:
            sched.start()
        try:
            yield
        finally:
            if scheduler_thread:
                sched.stop()

    app = FastAPI(
        title="qmerge",
        version=__version__,
        lifespan=lifespan,
        description="One base model, many compressed task vectors, one batch: "
        "OpenAI-compatible completions where `model` names the task.",
    )
    app.state.engine, app.state.scheduler, app.state.metrics = engine, sched, metrics
    app.state.qmerge = AppState(engine, sched, metrics, limits, name)
    _handlers(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.include_router(routes_generate.router)
    app.include_router(routes_info.router)
    return app
