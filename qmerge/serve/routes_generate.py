"""POST /v1/completions and /v1/chat/completions: OpenAI-compatible generation, with
server-sent-event streaming; the request's `model` names the task, mixture or router."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from qmerge.serve import protocol as P
from qmerge.serve.scheduler import Job
from qmerge.serve.state import AppState, Refused, state

router = APIRouter()
STREAM_DOC = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "JSON, or server-sent events when stream is true",
    }
}


def _usage(done: list) -> P.Usage:
    return P.Usage(
        **{
            k: sum(u[k] for _, _, u in done)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
    )


async def _generate(
    s: AppState,
    endpoint: str,
    req: P.Sampled,
    model: str,
    prompts: list[str],
    chat: bool,
    request: Request,
):
    t0 = time.monotonic()
    try:
        sampling = s.sampling(req)
        events: asyncio.Queue = asyncio.Queue()
        jobs = s.jobs("generate", model, prompts, sampling, events)
        s.submit(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            first = await s.next(events, jobs)
            if first[1][0] == "error":
                for j in jobs:
                    j.cancelled = True
                raise Refused(first[1][1], first[1][2])
            body = _stream(s, jobs, events, first, (rid, created, model, chat, endpoint, t0))
            return StreamingResponse(
                body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        done = await s.collect(jobs, events, request)
    except Refused as e:
        s.record(endpoint, model, e.status, t0)
        raise
    s.record(endpoint, model, 200, t0)
    if chat:
        return P.ChatResponse(
            id=rid,
            created=created,
            model=model,
            usage=_usage(done),
            choices=[
                P.ChatChoice(index=i, finish_reason=f, message=P.AssistantMessage(content=t))
                for i, (t, f, _) in enumerate(done)
            ],
        )
    return P.CompletionResponse(
        id=rid,
        created=created,
        model=model,
        usage=_usage(done),
        choices=[
            P.CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f, _) in enumerate(done)
        ],
    )


def _chunk(meta: tuple, i: int, text: str | None, finish: str | None, role: bool = False) -> str:
    rid, created, model, chat = meta[:4]
    if chat:
        delta: dict = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice: dict = {"index": i, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
    obj = "chat.completion.chunk" if chat else "text_completion"
    return (
        "data: "
        + json.dumps(
            {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        )
        + "\n\n"
    )


async def _stream(
    s: AppState, jobs: list[Job], events: asyncio.Queue, first: tuple, meta: tuple
) -> AsyncIterator[str]:
    """meta: (id, created, model, chat, endpoint, t0)."""
    model, chat, endpoint, t0 = meta[2:]
    left, status = len(jobs), 200
    try:
        if chat:
            for i in range(len(jobs)):
                yield _chunk(meta, i, None, None, role=True)
        item = first
        while True:
            i, ev = item
            if ev[0] == "delta":
                yield _chunk(meta, i, ev[1], None)
            elif ev[0] == "done":
                yield _chunk(meta, i, None, ev[1])
                left -= 1
            else:
                status = ev[1]
                yield "data: " + json.dumps(P.error(ev[1], ev[2])) + "\n\n"
                break
            if not left:
                break
            try:
                item = await s.next(events, jobs)
            except Refused as e:
                status = e.status
                yield "data: " + json.dumps(P.error(e.status, e.message)) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:
            j.cancelled = True
        s.record(endpoint, model, status, t0)


@router.post(
    "/v1/completions",
    response_model=P.CompletionResponse,
    responses=P.responses(400, 404, 429, 504) | STREAM_DOC,
)
async def completions(
    req: P.CompletionRequest,
    request: Request,
    s: AppState = Depends(state),  # noqa: B008
):
    """Completes a prompt (or several) with the task, mixture or router `model` names."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise Refused(400, "prompt: give at least one prompt")
    return await _generate(s, "completions", req, req.model, prompts, False, request)


@router.post(
    "/v1/chat/completions",
    response_model=P.ChatResponse,
    responses=P.responses(400, 404, 429, 504) | STREAM_DOC,
)
async def chat_completions(
    req: P.ChatRequest,
    request: Request,
    s: AppState = Depends(state),  # noqa: B008
):
    """The assistant's reply to a conversation (the base tokenizer's chat template)."""
    if s.engine.kind != "generate":
        s.sampling(req)  # raises the same message as /v1/completions
    prompt = s.engine.chat_prompt([m.model_dump() for m in req.messages])
    return await _generate(s, "chat", req, req.model, [prompt], True, request)
