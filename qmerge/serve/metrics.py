"""Counters and histograms of the server, written in the Prometheus text format (version 0.0.4)
at GET /metrics. Updated from the event loop and the scheduler thread under one lock.

    qmerge_requests_total{endpoint, task, status}       counter
    qmerge_request_seconds{endpoint, task}              histogram of request latency
    qmerge_generated_tokens_total{task}                 counter
    qmerge_batch_size{phase}                            histogram (prefill, decode, classify)
    qmerge_queue_depth                                  gauge: requests waiting
    qmerge_running_sequences                            gauge: sequences in the decoding batch
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def task_label(model: str, known: frozenset[str] | set[str] | tuple[str, ...] = ()) -> str:
    """The `task` label of a request: a task in `known`, 'base', 'auto', 'mixture', or
    'other' (a name no task has: labels must not be as many as the names clients send)."""
    if model in known or model in ("base", "auto"):
        return model
    return "mixture" if ("+" in model or ":" in model) else "other"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [
            f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}'
            for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        brace = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{brace} {self.sum:.6f}")
        out.append(f"{name}_count{brace} {self.total}")
        return out


def _labels(**kv: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.known: tuple[str, ...] = ()  # the served tasks (set by the scheduler)
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[tuple[str, str], _Histogram] = {}
        self.generated: dict[str, int] = defaultdict(int)
        self.batches: dict[str, _Histogram] = {}
        self.queue_depth = 0
        self.running = 0

    def request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        task = task_label(model, self.known)
        with self._lock:
            self.requests[(endpoint, task, status)] += 1
            self.latency.setdefault((endpoint, task), _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def tokens(self, model: str, n: int = 1) -> None:
        with self._lock:
            self.generated[task_label(model, self.known)] += n

    def batch(self, phase: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(phase, _Histogram(BATCH_BUCKETS)).observe(size)
            if phase == "decode":
                self.running = size

    def render(self) -> str:
        with self._lock:
            out = [
                "# HELP qmerge_requests_total Requests answered, by endpoint, task and "
                "HTTP status.",
                "# TYPE qmerge_requests_total counter",
            ]
            for (ep, task, status), n in sorted(self.requests.items()):
                labels = _labels(endpoint=ep, task=task, status=str(status))
                out.append(f"qmerge_requests_total{{{labels}}} {n}")
            out += [
                "# HELP qmerge_request_seconds Request latency, from arrival to the last byte.",
                "# TYPE qmerge_request_seconds histogram",
            ]
            for (ep, task), h in sorted(self.latency.items()):
                out += h.lines("qmerge_request_seconds", _labels(endpoint=ep, task=task))
            out += [
                "# HELP qmerge_generated_tokens_total Tokens generated, by task.",
                "# TYPE qmerge_generated_tokens_total counter",
            ]
            for task, n in sorted(self.generated.items()):
                out.append(f"qmerge_generated_tokens_total{{{_labels(task=task)}}} {n}")
            out += [
                "# HELP qmerge_batch_size Rows per forward pass, by phase.",
                "# TYPE qmerge_batch_size histogram",
            ]
            for phase, h in sorted(self.batches.items()):
                out += h.lines("qmerge_batch_size", _labels(phase=phase))
            out += [
                "# HELP qmerge_queue_depth Requests waiting for the scheduler.",
                "# TYPE qmerge_queue_depth gauge",
                f"qmerge_queue_depth {self.queue_depth}",
                "# HELP qmerge_running_sequences Sequences in the decoding batch.",
                "# TYPE qmerge_running_sequences gauge",
                f"qmerge_running_sequences {self.running}",
            ]
        return "\n".join(out) + "\n"
