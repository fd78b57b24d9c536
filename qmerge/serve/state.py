"""What every HTTP route shares: the server's limits, its engine, scheduler and metrics, and the
job plumbing between a request handler and the scheduler thread (submit, wait, collect).

A handler validates what it can without the model (shapes, limits, prompt length), turns its
request into scheduler jobs (one per prompt or per text), and waits for their events. Bad input
raises `Refused(status, message)`, which app.py turns into an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import queue
import time
from dataclasses import dataclass, field

from fastapi import Request

from qmerge.serve import protocol as P
from qmerge.serve.engine import Engine
from qmerge.serve.mailbox import Mailbox
from qmerge.serve.metrics import Metrics
from qmerge.serve.scheduler import Job, Scheduler
from qmerge.serve.sequence import Sampling


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32  # sequences decoded together (and texts classified together)
    window_ms: float = 5.0  # how long an idle scheduler waits for more requests
    max_queue: int = 256  # waiting jobs before 429
    timeout_s: float = 120.0  # per request, from arrival to the last token
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # per completion
    max_inputs: int = 64  # prompts per completion request, texts per classify
    max_request_bytes: int = 4 << 20  # a request body, checked before it is parsed
    # characters of one prompt or text, checked before it is tokenized (a token rarely
    # covers more than a few dozen characters, so a longer prompt is over max_prompt_tokens;
    # a classify text past the model's context is cut there anyway)
    max_text_chars: int = 64 * 2048


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class AppState:
    engine: Engine
    sched: Scheduler
    metrics: Metrics
    limits: Limits
    name: str | None = None  # the pack's public name: a model 'name/task' means 'task'
    # per event loop: the scheduler's events reach handlers in one wakeup per batch
    _mailboxes: dict = field(default_factory=dict, repr=False)

    def local(self, model: str) -> str:
        """`model` without the pack's name ('code/fix' -> 'fix' when this pack is 'code'); one
        application serving several packs (serve/ray.py) names tasks so."""
        if self.name and model.startswith(self.name + "/"):
            return model[len(self.name) + 1 :]
        return model

    def submit(self, jobs: list[Job]) -> None:
        for i, j in enumerate(jobs):
            try:
                self.sched.submit(j)
            except queue.Full:
                for k in jobs[:i]:
                    k.cancelled = True
                raise Refused(
                    429,
                    f"the server is at its queue bound "
                    f"({self.limits.max_queue} waiting); retry later",
                ) from None

    def jobs(
        self,
        kind: str,
        model: str,
        texts: list[str],
        sampling: Sampling | None,
        events: asyncio.Queue,
    ) -> list[Job]:
        if len(texts) > self.limits.max_inputs:
            raise Refused(
                400, f"{len(texts)} inputs in one request; at most {self.limits.max_inputs}"
            )
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.limits.timeout_s
        jobs = []
        for i, t in enumerate(texts):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise Refused(
                    400, f"input {i}: is not valid Unicode (a lone surrogate such as \\udcff)"
                ) from None
        if long := [i for i, t in enumerate(texts) if len(t) > self.limits.max_text_chars]:
            raise Refused(
                400,
                f"input {long[0]}: {len(texts[long[0]])} characters; this server reads at most "
                f"{self.limits.max_text_chars} per prompt or text",
            )
        box = self._mailboxes.get(loop)
        if box is None:
            box = self._mailboxes[loop] = Mailbox(loop)
        for i, text in enumerate(texts):

            def emit(ev: tuple, i: int = i) -> None:
                box.post(events, (i, ev))

            job = Job(
                kind, self.local(model), emit, deadline, text=text, sampling=sampling or Sampling()
            )
            if kind == "generate":
                job.prompt = self.prompt(text, sampling)
            jobs.append(job)
        return jobs

    def prompt(self, text: str, sampling: Sampling | None) -> list[int]:
        ids = self.engine.encode(text)
        if not ids:
            raise Refused(400, "prompt: is empty after tokenization")
        if len(ids) > self.limits.max_prompt_tokens:
            raise Refused(
                400,
                f"prompt: {len(ids)} tokens; this server takes at most "
                f"{self.limits.max_prompt_tokens}",
            )
        if sampling and len(ids) + sampling.max_tokens > self.engine.context:
            raise Refused(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens "
                f"({sampling.max_tokens}) exceed the model's context of "
                f"{self.engine.context} tokens",
            )
        return ids

    def sampling(self, req: P.Sampled) -> Sampling:
        kind = self.engine.kind
        if kind != "generate":
            raise Refused(
                400,
                f"this server's model is a {kind} model; use /v1/classify"
                if kind == "classify"
                else "this server's model has no LM head; it cannot generate",
            )
        if req.max_tokens > self.limits.max_tokens:
            raise Refused(
                400,
                f"max_tokens: {req.max_tokens}; this server generates at most "
                f"{self.limits.max_tokens}",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise Refused(400, "stop: give at most 4 non-empty strings")
        return Sampling(req.max_tokens, req.temperature, req.top_p, tuple(stop), req.seed)

    async def next(
        self, events: asyncio.Queue, jobs: list[Job], gone: asyncio.Future | None = None
    ) -> tuple:
        """The next event of `jobs`; Refused 504 past their deadline, 499 once `gone` (the
        client's disconnect) is done. Either way the jobs are cancelled."""
        timeout = max(jobs[0].deadline - time.monotonic(), 0)
        get = asyncio.ensure_future(events.get())
        waiting = {get} if gone is None else {get, gone}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        for j in jobs:
            j.cancelled = True
        if gone is not None and gone in done:
            raise Refused(499, "the client disconnected; its request was cancelled")
        raise Refused(504, f"the request took longer than {self.limits.timeout_s:g} s")

    async def collect(
        self, jobs: list[Job], events: asyncio.Queue, request: Request | None = None
    ) -> list:
        """Every job's final state: (text, finish, usage) for a generation, the answer for a
        classification. Raises Refused on the first error (the other jobs are cancelled), and
        when `request`'s client disconnects first (its jobs would hold batch slots and queue
        places for an answer nobody reads)."""
        out: list = [None] * len(jobs)
        texts = [""] * len(jobs)
        left = len(jobs)
        gone = asyncio.ensure_future(disconnected(request)) if request is not None else None
        try:
            while left:
                i, ev = await self.next(events, jobs, gone)
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
        finally:
            if gone is not None:
                gone.cancel()
        return out

    def record(self, endpoint: str, model: str, status: int, t0: float) -> None:
        self.metrics.request(endpoint, self.local(model), status, time.monotonic() - t0)


async def disconnected(request: Request) -> None:
    """Returns once the client of `request` (whose body was read) has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def state(request: Request) -> AppState:
    """The app's shared state (a FastAPI dependency)."""
    return request.app.state.qmerge
