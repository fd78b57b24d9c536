"""Running `qmerge serve` in a child process and driving it over loopback HTTP, for the serve
benchmark (bench/serve.py): a free port, the process's memory, a concurrent load generator and
a bounded fuzzer. Every request goes to 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

from bench.common import QMERGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Proc:
    """A `qmerge serve` process on a free loopback port."""

    def __init__(
        self, pack: Path, base: Path, *args: str, cwd: Path | None = None, env: dict | None = None
    ):
        """`cwd`/`env`: run another tree's qmerge (bench/serve_ab.py)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.p = subprocess.Popen(
            [
                *QMERGE,
                "serve",
                str(pack),
                "--base",
                str(base),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )

    def wait(self, timeout: float = 300) -> Proc:
        import httpx

        end = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.p.poll() is not None:
                err = self.p.stderr.read() if self.p.stderr else ""
                raise RuntimeError(f"server exited: {err}")
            if time.monotonic() > end:
                raise RuntimeError("server did not start")
            time.sleep(0.3)

    def rss_mb(self) -> tuple[float, float]:
        return status_kb(self.p.pid, "VmRSS") / 1024, status_kb(self.p.pid, "VmHWM") / 1024

    def rss(self) -> str:
        now, peak = self.rss_mb()
        return f"{now:.0f} / {peak:.0f}"

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()


async def load(reqs: list[dict], url_of, clients: int, timeout: float) -> tuple[list, float]:
    """Sends every request with `clients` concurrent clients; returns (status, latency, text)
    per request and the wall time."""
    import httpx

    out: list = [None] * len(reqs)
    nxt = iter(range(len(reqs)))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:

        async def worker():
            for i in nxt:
                r = reqs[i]
                t0 = time.perf_counter()
                resp = await c.post(url_of(r) + "/v1/completions", json=r)
                dt = time.perf_counter() - t0
                text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else None
                out[i] = (
                    resp.status_code,
                    dt,
                    text,
                    resp.json()["usage"]["completion_tokens"] if text is not None else 0,
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return out, wall


def fuzz(url: str, n: int) -> Counter:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    cases = st.one_of(
        [
            op.as_strategy(m)
            for op in ops
            for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    codes: Counter = Counter()

    @given(case=cases)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def one(case):
        r = case.call(base_url=url, timeout=60)
        codes[(case.method, case.path, r.status_code)] += 1

    one()
    return codes


def wait_for(pred, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("timed out")
        time.sleep(0.05)
    return time.monotonic() - t0
