"""The scheduler: one thread that owns the engine and forms batches across tasks.

Each turn of its loop
  1. takes the requests that arrived (waiting up to the batch window for more when idle),
  2. answers classification requests in one mixed forward,
  3. prefills new generations in one forward and lets them join the running batch,
  4. runs one decoding step for every running sequence, whatever its task
     (iteration-level batching: a sequence leaves the batch the step it finishes).

Request handlers talk to it only through `submit` (a bounded queue: full means HTTP 429) and
the `emit` callback of their job, which must be safe to call from this thread. A request
that fails (bad route, a forward that raises on its input) fails alone; the loop goes on.
When the pack changes on disk the scheduler stops admitting, lets the running sequences
finish, reloads, and admits again: a removed task then answers 404, an added one is served.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qmerge.errors import QmergeError, UnknownTask
from qmerge.routing.route import AUTO
from qmerge.serve.engine import Engine
from qmerge.serve.kv import KV
from qmerge.serve.metrics import Metrics
from qmerge.serve.sequence import Sampling, Sequence, greedy_rows

log = logging.getLogger("qmerge.serve")


@dataclass(eq=False)
class Job:
    """One prompt or one text to classify. `emit` receives ('delta', text), ('done',
    finish_reason, usage), ('result', answer) or ('error', http_status, message); it must be
    safe to call from the scheduler thread."""

    kind: str  # 'generate' | 'classify'
    model: str  # the request's `model`: task, mixture, 'base' or 'auto'
    emit: Callable[[tuple], None]
    deadline: float  # time.monotonic() after which it is abandoned
    prompt: list[int] = field(default_factory=list)
    text: str = ""  # the prompt (for the router), or the text to classify
    sampling: Sampling = field(default_factory=Sampling)
    cancelled: bool = False
    route: object = None  # set on admission: what `model` resolves to now
    seq: Sequence | None = None
    started: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        window_ms: float = 5.0,
        max_queue: int = 256,
        poll_s: float = 0.5,
    ):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.poll_s = poll_s
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="qmerge-scheduler", daemon=True)
        self._running = False
        self.active: list[Job] = []
        self.kv: KV | None = None
        self.draining = False
        self._last_poll = 0.0
        metrics.known = engine.tasks

    # --- handler side -----------------------------------------------------------------------

    def start(self) -> None:
        """Runs the loop in a thread of its own."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queues a job; raises queue.Full when the queue is at its bound."""
        self.queue.put_nowait(job)
        self.metrics.queue_depth = self.queue.qsize()

    def alive(self) -> bool:
        return self._running

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Runs the loop in the calling thread until `stop`. Best in the thread that loaded
        the model: torch's CPU thread pool then has one owner (a second thread running
        parallel ops next to an idle pool of the first made decoding steps up to 1.5x slower
        on 2 cores, bench/results/serve.md)."""
        self._running = True
        try:
            while not self._stop.is_set():
                try:
                    self._turn()
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    log.exception("scheduler turn failed; failing the running batch")
                    self._fail(self.active, 500, "internal error while decoding this batch")
                    self.active, self.kv = [], None
        finally:
            self._running = False

    def _turn(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= self.poll_s:
            self._last_poll = now
            if self.engine.changed():
                self.draining = True
        if self.draining and not self.active:
            self.engine.reload()
            self.metrics.known = self.engine.tasks
            self.draining = False
        jobs = [] if self.draining else self._collect()
        self.metrics.queue_depth = self.queue.qsize()
        self.metrics.running = len(self.active)
        self._drop_abandoned()
        classify = [j for j in jobs if j.kind == "classify"]
        generate = [j for j in jobs if j.kind == "generate"]
        if classify:
            self._classify(classify)
        if generate:
            self._admit(generate)
        if self.active:
            self._step()

    def _collect(self) -> list[Job]:
        """New jobs: if nothing runs, block for the first, then gather for the window."""
        room = self.max_batch - len(self.active)
        jobs: list[Job] = []
        if room <= 0:
            return jobs
        if not self.active:
            try:
                jobs.append(self.queue.get(timeout=self.poll_s))
            except queue.Empty:
                return jobs
            end = time.monotonic() + self.window
            while len(jobs) < room:
                left = end - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
        while len(jobs) < room:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return [jobs[i] for i in _live(jobs, "in the queue")]

    def _drop_abandoned(self) -> None:
        keep = _live(self.active, "while generating")
        if len(keep) != len(self.active):
            self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        self.active = [self.active[i] for i in rows]
        self.kv = self.kv.select(rows) if self.kv is not None and rows else None

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for j in jobs:
            j.emit(("error", status, message))

    def _routes(self, jobs: list[Job]) -> list[Job]:
        """Resolves each job's route against the tasks served now; fails the ones that name
        none (404) or a bad mixture (400). 'auto' jobs are routed by the pack's router."""
        ok, auto = [], []
        for j in jobs:
            try:
                route = self.engine.check_route(j.model)
            except UnknownTask as e:
                j.emit(("error", 404, str(e)))
                continue
            except QmergeError as e:
                j.emit(("error", 400, str(e)))
                continue
            j.route = route
            (auto if route == AUTO else ok).append(j)
        if auto:
            try:
                for j, r in zip(
                    auto, self.engine.resolve_auto([j.text for j in auto]), strict=True
                ):
                    j.route = r
                ok.extend(auto)
            except Exception as e:  # noqa: BLE001
                log.exception("routing failed")
                self._fail(auto, 500, f"routing failed: {e}")
        return ok

    # --- classification ----------------------------------------------------------------------

    def _classify(self, jobs: list[Job]) -> None:
        jobs = self._routes(jobs)
        if not jobs:
            return
        self.metrics.batch("classify", len(jobs))
        try:
            answers = self.engine.classify([(j.text, j.route) for j in jobs])
        except Exception as e:  # noqa: BLE001 - retry one by one: only a failing job fails
            if len(jobs) == 1:
                if isinstance(e, QmergeError):  # the request's fault (a mixture of heads
                    self._fail(jobs, 400, str(e))  # with different label counts)
                    return
                log.exception("classification failed")
                self._fail(jobs, 500, "classification failed for this input")
                return
            for j in jobs:
                self._classify([j])
            return
        for j, a in zip(jobs, answers, strict=True):
            j.emit(("result", a))

    # --- generation ---------------------------------------------------------------------------

    def _admit(self, jobs: list[Job]) -> None:
        jobs = self._routes(jobs)
        if not jobs:
            return
        e = self.engine
        for j in jobs:
            j.seq = Sequence(j.prompt, j.route, j.sampling, e.eos, e.decode, e.context)
        self._prefill(jobs)

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward for the new prompts; if it raises, each prompt alone, so only a
        failing prompt fails."""
        try:
            logits, kv = self.engine.prefill([j.seq for j in jobs])  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001
            if len(jobs) == 1:
                if isinstance(e, QmergeError):  # the request's fault, not the server's
                    self._fail(jobs, 400, str(e))
                    return
                log.exception("prefill failed")
                self._fail(jobs, 500, "the forward pass failed on this prompt")
                return
            for j in jobs:
                self._prefill([j])
            return
        self.metrics.batch("prefill", len(jobs))
        self._emit_tokens(jobs, logits, kv)

    def _emit_tokens(self, jobs: list[Job], logits, kv: KV) -> None:
        """Pushes each new sequence's first token; the unfinished ones join the batch."""
        keep = []
        greedy = greedy_rows(logits)
        for i, j in enumerate(jobs):
            if self._push(j, logits[i], greedy[i]):
                keep.append(i)
        if keep:
            new = kv.select(keep) if len(keep) != len(jobs) else kv
            self.kv = new if self.kv is None else self.kv.join(new)
            self.active.extend(jobs[i] for i in keep)

    def _push(self, j: Job, logits, greedy: int) -> bool:
        """The job's next token (`greedy`: its row's argmax, taken for the batch); emits its
        text, and 'done' when it finishes. True if it goes on."""
        seq = j.seq
        assert seq is not None
        delta = seq.push(logits, greedy)
        self.metrics.tokens(j.model)
        if delta:
            j.emit(("delta", delta))
        if seq.finish is None:
            return True
        j.emit(
            (
                "done",
                seq.finish,
                {
                    "prompt_tokens": len(seq.prompt),
                    "completion_tokens": len(seq.tokens),
                    "total_tokens": len(seq.prompt) + len(seq.tokens),
                },
            )
        )
        return False

    def _step(self) -> None:
        assert self.kv is not None
        self.metrics.batch("decode", len(self.active))
        logits, kv = self.engine.step([j.seq for j in self.active], self.kv)  # type: ignore
        self.kv = kv
        greedy = greedy_rows(logits)
        keep = [
            i
            for i, j in enumerate(self.active)
            if not j.cancelled and self._push(j, logits[i], greedy[i])
        ]
        if len(keep) != len(self.active):
            self._keep(keep)


def _live(jobs: list[Job], where: str) -> list[int]:
    """Indices of the jobs still wanted: a cancelled job is dropped silently, one past its
    deadline is told it timed out (504)."""
    now = time.monotonic()
    keep = []
    for i, j in enumerate(jobs):
        if j.cancelled:
            continue
        if now > j.deadline:
            j.emit(("error", 504, f"the request timed out {where}"))
            continue
        keep.append(i)
    return keep
