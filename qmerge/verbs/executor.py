"""Where the units of a distributed verb run: on Ray, or one after another in this process.

A unit is plain data (a frozen dataclass naming paths, tensors and options) and a module-level
function that does it and returns plain data; it reads its inputs by path and writes its output
files itself, so a unit is idempotent: run twice, it writes the same bytes. `Ray.map` sends
each unit to a Ray task (one CPU each), retries a unit whose worker died (`max_retries`; an
error the unit raises, such as a NaN in a delta, is not retried: it is the verb's error), and
returns the results in unit order. `Inline` runs the same units here; it is the reference the
Ray path is tested against and a way to debug a unit.

A unit says how many intra-op threads it runs with (`unit.threads`) and reserves that many
CPUs: one, unless its results depend on the thread count (BLAS sums in an order set by it: the
SVDs of the low-rank codec), when it is the planning process's count, so that the pack's bytes
do not depend on where a unit ran. Two single-threaded units per two cores, not two threads
each: oversubscribed, torch's spinning thread pools made a Ray compress 4x slower (measured).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qmerge.errors import ConfigError

RAY_VERSION = "2.60.0"  # the release qmerge is tested with (scripts/install.sh)
# Test hook, "INDEX:MARKER": the first attempt of unit INDEX exits its worker process hard
# (as a node's OOM killer would) once it has written some of its files; MARKER is created so
# the retry runs normally. Passed to Ray's workers by `Ray.map` when set here.
FAILPOINT = "QMERGE_FAILPOINT_KILL_UNIT"


@dataclass
class Report:
    """What a distributed verb did: for `--json`."""

    executor: str
    units: int = 0
    retries: int = 0
    seconds: float = 0.0
    workers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_in_worker = [False]  # set by `_call` in a Ray worker: the failpoint never kills a coordinator


def failpoint(index: int) -> None:
    """Dies here if FAILPOINT names this unit and its marker is not there yet (see above)."""
    spec = os.environ.get(FAILPOINT)
    if not spec or not _in_worker[0]:
        return
    which, _, marker = spec.partition(":")
    if which.isdigit() and int(which) == index and marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(17)


def _call(fn: Callable[[Any], Any], unit: Any, attempts: str, remote: bool = False) -> Any:
    """Runs one unit at its thread count, leaving a mark per attempt (`remote`: in a worker)."""
    _in_worker[0] = remote
    torch.set_num_threads(getattr(unit, "threads", 1))
    mark = Path(attempts) / f"{getattr(unit, 'index', 0)}-{os.getpid()}-{secrets.token_hex(4)}"
    mark.touch()
    return fn(unit)


def _retries(attempts: Path, units: int) -> int:
    return max(0, sum(1 for _ in attempts.iterdir()) - units) if attempts.is_dir() else 0


def _warm() -> None:
    """A new worker's imports (torch, the units' modules), done while the coordinator is
    still checking inputs: they cost about 1.5 s per worker on this 2-core machine."""
    import qmerge.verbs.compress_units  # noqa: F401
    import qmerge.verbs.merge_units  # noqa: F401


class Inline:
    """The units one after another in this process (the reference of the Ray path)."""

    name = "inline"

    def __init__(self) -> None:
        self.report = Report(self.name, workers=1)

    def start(self) -> None:
        """Gets workers ready before any unit exists (a no-op here)."""

    def map(
        self,
        fn: Callable[[Any], Any],
        units: Sequence[Any],
        scratch: Path,
        progress: Callable[[Iterable], Iterable] = lambda it: it,
    ) -> list[Any]:
        """`fn(unit)` for every unit, in unit order; `progress` wraps the completions."""
        t0 = time.perf_counter()
        attempts = scratch / f"attempts-{secrets.token_hex(4)}"  # one per map: its retries
        attempts.mkdir()
        results: list[Any] = [None] * len(units)
        done = self._completions(fn, units, str(attempts))
        try:
            for i, r in progress(done):
                results[i] = r
        finally:
            done.close()
        self.report.units += len(units)
        self.report.retries += _retries(attempts, len(units))
        self.report.seconds += time.perf_counter() - t0
        return results

    def _completions(
        self, fn: Callable[[Any], Any], units: Sequence[Any], attempts: str
    ) -> Generator[tuple[int, Any], None, None]:
        threads = torch.get_num_threads()
        try:
            for i, u in enumerate(units):
                yield i, _call(fn, u, attempts)
        finally:
            torch.set_num_threads(threads)


class Ray(Inline):
    """The units as Ray tasks, on a local Ray (started here with `workers` CPUs, default all
    of this machine's) or on the cluster at `address` ("auto": the one `ray start` runs)."""

    name = "ray"

    def __init__(
        self, address: str | None = None, workers: int | None = None, max_retries: int = 3
    ):
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.report = Report(self.name)
        self._warmed: list = []

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise ConfigError(
                f"--executor ray needs Ray: pip install 'ray=={RAY_VERSION}' (or 'qmerge[ray]')"
            ) from None
        if not ray.is_initialized():
            kw: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                cpus = self.workers or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, **kw)
        return ray

    def start(self) -> None:
        """Connects to (or starts) Ray and has `workers` workers import what units need, in
        the background: the coordinator fingerprints the base meanwhile."""
        ray = self._ray()
        if not self._warmed:
            window = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            warm = ray.remote(_warm).options(num_cpus=1)
            self._warmed = [warm.remote() for _ in range(window)]

    def _completions(
        self, fn: Callable[[Any], Any], units: Sequence[Any], attempts: str
    ) -> Generator[tuple[int, Any], None, None]:
        """(unit index, result) as units finish, at most `workers` (default: the cluster's
        CPUs) in flight; the rest are cancelled if one fails or the caller stops."""
        ray = self._ray()
        window = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.report.workers = window
        opts: dict[str, Any] = {"max_retries": self.max_retries}
        if os.environ.get(FAILPOINT):
            opts["runtime_env"] = {"env_vars": {FAILPOINT: os.environ[FAILPOINT]}}
        widest = max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
        remote = ray.remote(_call)
        todo = list(enumerate(units))[::-1]
        running: dict[Any, int] = {}
        try:
            while todo or running:
                while todo and len(running) < window:
                    i, u = todo.pop()
                    cpus = min(getattr(u, "threads", 1), widest)  # schedulable on some node
                    ref = remote.options(num_cpus=cpus, **opts).remote(fn, u, attempts, True)
                    running[ref] = i
                [ref], _ = ray.wait(list(running), num_returns=1)
                i = running.pop(ref)
                yield i, _get(ray, ref)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


def _get(ray, ref) -> Any:
    """A unit's result; the error a unit raised is raised as itself (not Ray's wrapper)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if cause is not None:
            raise cause from None
        raise


def resolve(
    executor: str | Inline | None, address: str | None = None, workers: int | None = None
) -> Inline | None:
    """None for "local" (the verbs' own one-process path), else the executor to run units on."""
    if executor is None or executor == "local":
        if address is not None or workers is not None:
            raise ConfigError("--ray-address and --workers need --executor ray")
        return None
    if isinstance(executor, Inline):
        return executor
    if executor == "ray":
        return Ray(address, workers)
    raise ConfigError(f"unknown executor {executor!r}; choose local or ray")
