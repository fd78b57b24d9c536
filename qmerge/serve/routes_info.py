"""POST /v1/classify (task heads), and what the server serves: GET /v1/models, /health and
/metrics."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from qmerge.serve import protocol as P
from qmerge.serve.state import AppState, Refused, state

router = APIRouter()


@router.post(
    "/v1/classify", response_model=P.ClassifyResponse, responses=P.responses(400, 404, 429, 504)
)
async def classify(
    req: P.ClassifyRequest,
    request: Request,
    s: AppState = Depends(state),  # noqa: B008
):
    """Label and class probabilities of each text, from the task head of `model`."""
    t0 = time.monotonic()
    try:
        if s.engine.kind != "classify":
            raise Refused(
                400,
                "this server's model has no task heads; /v1/classify needs a "
                "pack compressed with --head (use /v1/completions)",
            )
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise Refused(400, "input: give at least one text")
        events: asyncio.Queue = asyncio.Queue()
        jobs = s.jobs("classify", req.model, texts, None, events)
        s.submit(jobs)
        out = await s.collect(jobs, events, request)
    except Refused as e:
        s.record("classify", req.model, e.status, t0)
        raise
    s.record("classify", req.model, 200, t0)
    return P.ClassifyResponse(
        id="cls-" + uuid.uuid4().hex[:24],
        created=int(time.time()),
        model=req.model,
        data=[
            P.Classification(index=i, label=a["label"], scores=a["scores"], route=a["route"])
            for i, a in enumerate(out)
        ],
    )


@router.get("/v1/models", response_model=P.ModelList)
async def models(s: AppState = Depends(state)):  # noqa: B008
    """The served tasks, plus 'base' and (with a router) 'auto'."""
    now, engine = int(time.time()), s.engine
    cards = [
        P.ModelCard(id=t, created=now, kind="task", labels=engine.labels.get(t))
        for t in engine.tasks
    ]
    cards.append(P.ModelCard(id="base", created=now, kind="base"))
    if engine.has_router:
        cards.append(P.ModelCard(id="auto", created=now, kind="auto"))
    return P.ModelList(data=cards)


@router.get("/health", response_model=P.Health, responses=P.responses(503))
async def health(s: AppState = Depends(state)):  # noqa: B008
    """ok while the scheduler runs ('degraded' after a failed reload: the previous tasks are
    served); also the served tasks and the last reload error."""
    if not s.sched.alive():
        raise Refused(503, "the scheduler thread has stopped")
    return P.Health(
        status="degraded" if s.engine.reload_error else "ok",
        kind=s.engine.kind,
        tasks=list(s.engine.tasks),
        queue_depth=s.sched.queue.qsize(),
        running=len(s.sched.active),
        reload_error=s.engine.reload_error,
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(s: AppState = Depends(state)):  # noqa: B008
    """Counters and histograms in the Prometheus text format."""
    return PlainTextResponse(
        s.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
