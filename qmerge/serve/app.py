"""The HTTP API (FastAPI): OpenAI-compatible completions and chat completions (with
server-sent-event streaming), /v1/classify, /v1/models, /health and /metrics.

Handlers validate what they can without the model (shapes, limits, prompt length), turn a
request into scheduler jobs (one per prompt or per text), and wait for their events. Routes
are checked by the scheduler when it admits a job, against the tasks served at that moment.
Every error is an OpenAI-style body {"error": {"message", "type", "code"}} with a 4xx status
for bad input (400 malformed, 404 unknown task, 429 queue full, 504 timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qmerge.serve import protocol as P
from qmerge.serve.engine import Engine
from qmerge.serve.metrics import Metrics
from qmerge.serve.scheduler import Job, Scheduler
from qmerge.serve.sequence import Sampling

log = logging.getLogger("qmerge.serve")


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32            # sequences decoded together (and texts classified together)
    window_ms: float = 5.0         # how long an idle scheduler waits for more requests
    max_queue: int = 256           # waiting jobs before 429
    timeout_s: float = 120.0       # per request, from arrival to the last token
    max_prompt_tokens: int = 2048
    max_tokens: int = 512          # per completion
    max_inputs: int = 64           # prompts per completion request, texts per classify


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(P.error(status, message), status_code=status, headers=headers)


def create_app(engine: Engine, limits: Limits | None = None, *, metrics: Metrics | None = None,
               scheduler: Scheduler | None = None, scheduler_thread: bool = True) -> FastAPI:
    """The API over `engine`. With scheduler_thread=False the caller runs
    `app.state.scheduler.run()` itself (in the thread that loaded the model: server.py)."""
    limits = limits or Limits()
    metrics = metrics or Metrics()
    sched = scheduler or Scheduler(engine, metrics, max_batch=limits.max_batch,
                                   window_ms=limits.window_ms, max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if scheduler_thread:
            sched.start()
        try:
            yield
        finally:
            if scheduler_thread:
                sched.stop()

    app = FastAPI(title="qmerge", version="0.1.0", lifespan=lifespan,
                  description="One base model, many compressed task vectors, one batch: "
                  "OpenAI-compatible completions where `model` names the task.")
    app.state.engine, app.state.scheduler, app.state.metrics = engine, sched, metrics

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

    # --- jobs ----------------------------------------------------------------------------

    def _submit(jobs: list[Job]) -> None:
        for i, j in enumerate(jobs):
            try:
                sched.submit(j)
            except queue.Full:
                for k in jobs[:i]:
                    k.cancelled = True
                raise Refused(429, f"the server is at its queue bound ({limits.max_queue} "
                              f"waiting); retry later") from None

    def _jobs(kind: str, model: str, texts: list[str], sampling: Sampling | None,
              events: asyncio.Queue) -> list[Job]:
        if len(texts) > limits.max_inputs:
            raise Refused(400, f"{len(texts)} inputs in one request; at most "
                          f"{limits.max_inputs}")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + limits.timeout_s
        jobs = []
        for i, text in enumerate(texts):
            def emit(ev: tuple, i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, ev))
            job = Job(kind, model, emit, deadline, text=text,
                      sampling=sampling or Sampling())
            if kind == "generate":
                job.prompt = _prompt(text, sampling)
            jobs.append(job)
        return jobs

    def _prompt(text: str, sampling: Sampling | None) -> list[int]:
        ids = engine.encode(text)
        if not ids:
            raise Refused(400, "prompt: is empty after tokenization")
        if len(ids) > limits.max_prompt_tokens:
            raise Refused(400, f"prompt: {len(ids)} tokens; this server takes at most "
                          f"{limits.max_prompt_tokens}")
        if sampling and len(ids) + sampling.max_tokens > engine.context:
            raise Refused(400, f"prompt ({len(ids)} tokens) + max_tokens "
                          f"({sampling.max_tokens}) exceed the model's context of "
                          f"{engine.context} tokens")
        return ids

    def _sampling(req: P.Sampled) -> Sampling:
        if engine.kind != "generate":
            raise Refused(400, f"this server's model is a {engine.kind} model; use "
                          f"/v1/classify" if engine.kind == "classify" else
                          "this server's model has no LM head; it cannot generate")
        if req.max_tokens > limits.max_tokens:
            raise Refused(400, f"max_tokens: {req.max_tokens}; this server generates at most "
                          f"{limits.max_tokens}")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise Refused(400, "stop: give at most 4 non-empty strings")
        return Sampling(req.max_tokens, req.temperature, req.top_p, tuple(stop), req.seed)

    async def _next(events: asyncio.Queue, deadline: float, jobs: list[Job]) -> tuple:
        try:
            return await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            for j in jobs:
                j.cancelled = True
            raise Refused(504, f"the request took longer than {limits.timeout_s:g} s") from None

    async def _collect(jobs: list[Job], events: asyncio.Queue) -> list:
        """Every job's final state: (text, finish, usage) for a generation, the answer for a
        classification. Raises Refused on the first error (the other jobs are cancelled)."""
        out: list = [None] * len(jobs)
        texts = [""] * len(jobs)
        left = len(jobs)
        try:
            while left:
                i, ev = await _next(events, jobs[0].deadline, jobs)
                if ev[0] == "delta":
                    texts[i] += ev[1]
                elif ev[0] == "done":
                    out[i] = (texts[i], ev[1], ev[2])
                    left -= 1
                elif ev[0] == "result":
                    out[i] = ev[1]
                    left -= 1
                else:
                    raise Refused(ev[1], ev[2])
        except BaseException:
            for j in jobs:
                j.cancelled = True
            raise
        return out

    def _usage(done: list) -> P.Usage:
        return P.Usage(**{k: sum(u[k] for _, _, u in done) for k in
                          ("prompt_tokens", "completion_tokens", "total_tokens")})

    def _record(endpoint: str, model: str, status: int, t0: float) -> None:
        metrics.request(endpoint, model, status, time.monotonic() - t0)

    # --- generation ----------------------------------------------------------------------

    async def _generate(endpoint: str, req: P.Sampled, model: str, prompts: list[str],
                        chat: bool):
        t0 = time.monotonic()
        try:
            sampling = _sampling(req)
            events: asyncio.Queue = asyncio.Queue()
            jobs = _jobs("generate", model, prompts, sampling, events)
            _submit(jobs)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            created = int(time.time())
            if req.stream:
                first = await _next(events, jobs[0].deadline, jobs)
                if first[1][0] == "error":
                    for j in jobs:
                        j.cancelled = True
                    raise Refused(first[1][1], first[1][2])
                body = _stream(jobs, events, first, rid, created, model, chat, endpoint, t0)
                return StreamingResponse(body, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            done = await _collect(jobs, events)
        except Refused as e:
            _record(endpoint, model, e.status, t0)
            raise
        _record(endpoint, model, 200, t0)
        if chat:
            return P.ChatResponse(id=rid, created=created, model=model, usage=_usage(done),
                                  choices=[P.ChatChoice(index=i, finish_reason=f,
                                                        message=P.AssistantMessage(content=t))
                                           for i, (t, f, _) in enumerate(done)])
        return P.CompletionResponse(id=rid, created=created, model=model, usage=_usage(done),
                                    choices=[P.CompletionChoice(index=i, text=t, finish_reason=f)
                                             for i, (t, f, _) in enumerate(done)])

    async def _stream(jobs: list[Job], events: asyncio.Queue, first: tuple, rid: str,
                      created: int, model: str, chat: bool, endpoint: str,
                      t0: float) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        left, status = len(jobs), 200

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                choice: dict = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                          "model": model, "choices": [choice]}) + "\n\n"

        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, None, role=True)
            item = first
            while True:
                i, ev = item
                if ev[0] == "delta":
                    yield chunk(i, ev[1], None)
                elif ev[0] == "done":
                    yield chunk(i, None, ev[1])
                    left -= 1
                else:
                    status = ev[1]
                    yield "data: " + json.dumps(P.error(ev[1], ev[2])) + "\n\n"
                    break
                if not left:
                    break
                try:
                    item = await _next(events, jobs[0].deadline, jobs)
                except Refused as e:
                    status = e.status
                    yield "data: " + json.dumps(P.error(e.status, e.message)) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:
                j.cancelled = True
            _record(endpoint, model, status, t0)

    stream_doc = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                        "description": "JSON, or server-sent events when stream is true"}}

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses=P.responses(400, 404, 429, 504) | stream_doc)
    async def completions(req: P.CompletionRequest):
        """Completes a prompt (or several) with the task, mixture or router `model` names."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise Refused(400, "prompt: give at least one prompt")
        return await _generate("completions", req, req.model, prompts, chat=False)

    @app.post("/v1/chat/completions", response_model=P.ChatResponse,
              responses=P.responses(400, 404, 429, 504) | stream_doc)
    async def chat_completions(req: P.ChatRequest):
        """The assistant's reply to a conversation (the base tokenizer's chat template)."""
        if engine.kind != "generate":
            _sampling(req)  # raises the same message as /v1/completions
        prompt = engine.chat_prompt([m.model_dump() for m in req.messages])
        return await _generate("chat", req, req.model, [prompt], chat=True)

    @app.post("/v1/classify", response_model=P.ClassifyResponse,
              responses=P.responses(400, 404, 429, 504))
    async def classify(req: P.ClassifyRequest):
        """Label and class probabilities of each text, from the task head of `model`."""
        t0 = time.monotonic()
        try:
            if engine.kind != "classify":
                raise Refused(400, "this server's model has no task heads; /v1/classify needs "
                              "a pack compressed with --head (use /v1/completions)")
            texts = [req.input] if isinstance(req.input, str) else list(req.input)
            if not texts:
                raise Refused(400, "input: give at least one text")
            events: asyncio.Queue = asyncio.Queue()
            jobs = _jobs("classify", req.model, texts, None, events)
            _submit(jobs)
            out = await _collect(jobs, events)
        except Refused as e:
            _record("classify", req.model, e.status, t0)
            raise
        _record("classify", req.model, 200, t0)
        return P.ClassifyResponse(
            id="cls-" + uuid.uuid4().hex[:24], created=int(time.time()), model=req.model,
            data=[P.Classification(index=i, label=a["label"], scores=a["scores"],
                                   route=a["route"]) for i, a in enumerate(out)])

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        """The served tasks, plus 'base' and (with a router) 'auto'."""
        now = int(time.time())
        cards = [P.ModelCard(id=t, created=now, kind="task", labels=engine.labels.get(t))
                 for t in engine.tasks]
        cards.append(P.ModelCard(id="base", created=now, kind="base"))
        if engine.has_router:
            cards.append(P.ModelCard(id="auto", created=now, kind="auto"))
        return P.ModelList(data=cards)

    @app.get("/health", response_model=P.Health, responses=P.responses(503))
    async def health():
        """ok while the scheduler runs; also the served tasks and the last reload error."""
        if not sched.alive():
            raise Refused(503, "the scheduler thread has stopped")
        return P.Health(status="ok", kind=engine.kind, tasks=list(engine.tasks),
                        queue_depth=sched.queue.qsize(), running=len(sched.active),
                        reload_error=engine.reload_error)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Counters and histograms in the Prometheus text format."""
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
