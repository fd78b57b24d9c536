"""What every benchmark times with: medians over repeats, calls timed in turns (so this shared
VM's drifting memory bandwidth hits both sides of a ratio alike), and the same-run ceiling
every kernel is reported against, the copy bandwidth."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

_flush_buf: torch.Tensor | None = None


def flush_caches(k: int = 0) -> None:
    """Evicts the CPU caches by writing 64 MiB (a different byte each time)."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(64 << 20, dtype=torch.uint8)
    _flush_buf.fill_(k & 0xFF)


def timeit_alternating(
    fns: list[Callable[[], object]],
    cold: bool,
    min_reps: int = 9,
    budget_s: float = 4.0,
    shuffle: bool = False,
) -> list[float]:
    """Median seconds of each fn, timed in turns (one call of each per round): at least
    `min_reps` rounds, more while under `budget_s` (50 at most); with `cold`, the caches are
    flushed before every call. With `shuffle`, each round calls the fns in a new order (seeded):
    on this VM the call right after torch's GEMM ran 15-25% slower than the same call elsewhere
    in the round (sub-millisecond calls, cold; bench/results/kernels-cpu-notes.md), which a
    fixed order (or a rotated one: the same neighbours) charges to one fn only."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    rng = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < budget_s and rounds < 50):
        order = list(range(len(fns)))
        if shuffle:
            rng.shuffle(order)
        for k in order:
            if cold:
                flush_caches(rounds + k)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(t) for t in times]


def timeit(fn: Callable[[], object], cold: bool, min_reps: int = 5, budget_s: float = 1.5) -> float:
    """Median seconds of fn() over repeats (at least min_reps, more while under budget_s)."""
    return timeit_alternating([fn], cold, min_reps, budget_s)[0]


def paired(
    base: Callable[[], object], fn: Callable[[], object], reps: int
) -> tuple[float, float, float]:
    """(base s, fn s, median of the per-pair ratios fn/base), base and fn run in turns so that
    the VM's slow spells (copy bandwidth and GEMM speed both swing by +-20% within seconds)
    hit both alike."""
    for _ in range(3):
        base()
        fn()
    tb, tf, ratios = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        tf.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(tb), statistics.median(tf), statistics.median(ratios)


def best_of(n: int) -> Callable[[Callable[[], object]], float]:
    """A timer: the fastest of n calls, in seconds (a probe of the machine at its best)."""

    def timer(fn: Callable[[], object]) -> float:
        out = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    return timer


def copy_bandwidth(
    nbytes: int = 256 << 20,
    device: str = "cpu",
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> float:
    """GB/s of one large copy, read and write counted: the memory ceiling of the same run.
    `timer(fn)` gives seconds per call (default: the cold-cache median of `timeit`)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)  # never zeros
    dst = torch.empty_like(src)
    seconds = (timer or (lambda fn: timeit(fn, cold=True)))(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9
