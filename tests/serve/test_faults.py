"""The HTTP server under faults and hostile input (issue 30): oversized bodies, vanishing
sampling values, a failing forward, a slow server, a client that hangs up, a pack corrupted
under a running server. Every other client keeps getting its answer."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from qmerge.serve import Limits, Server  # noqa: E402
from tests.serve.lm import PROMPTS, complete  # noqa: E402


def test_oversized_bodies_get_413_and_the_server_keeps_going(server):
    """Issue 30, 4: a body over --max-request-bytes is refused before it is parsed, whether
    it says its length or arrives chunked."""
    big = b'{"model": "t0", "prompt": "' + b"a" * (5 << 20) + b'"}'
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]

        def chunks():
            for i in range(0, len(big), 1 << 16):
                yield big[i : i + (1 << 16)]

        r = c.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        assert c.get("/health").json()["status"] == "ok"


def test_hostile_sampling_values_do_not_fail_the_batch(server):
    """Issue 30, 3: a request with a vanishing temperature and nucleus is answered (greedily),
    and so are the requests batched with it."""
    bodies = [
        {
            "model": "t1",
            "prompt": "the cat",
            "max_tokens": 6,
            "temperature": 1e-40,
            "top_p": 1e-300,
            "seed": 1,
        },
        {"model": "t0", "prompt": "a big red dog", "max_tokens": 6, "temperature": 0},
    ]

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    for r in asyncio.run(both()):
        assert r.status_code == 200, r.text


def test_failures_stay_with_their_request(lm, offline, monkeypatch):
    """A prompt whose forward raises fails alone (500); the others in its batch are answered
    exactly; a slow server gives 429 past its queue bound and 504 past the timeout, and keeps
    answering."""
    _, base, pack, _ = lm
    with Server(pack, base, Limits(max_tokens=24, max_batch=8, max_queue=4, timeout_s=3)) as s:
        engine = s.engine
        real_prefill, real_step = engine.prefill, engine.step
        poison = engine.encode("blue")[0]

        def prefill(seqs):
            if any(poison in q.prompt for q in seqs):
                raise RuntimeError("injected fault")
            return real_prefill(seqs)

        monkeypatch.setattr(engine, "prefill", prefill)
        prompts = [PROMPTS[0], "red blue big", PROMPTS[1], PROMPTS[3]]
        with httpx.Client(base_url=s.url, timeout=60) as c:
            with ThreadPoolExecutor(4) as ex:
                got = list(ex.map(lambda p: complete(c, "t1", p, 6), prompts))
            assert got[1].status_code == 500
            for p, r in zip(prompts, got, strict=True):
                if p != "red blue big":
                    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(
                        "t1", p, 6
                    )

            def slow(seqs, kv):
                time.sleep(0.3)
                return real_step(seqs, kv)

            monkeypatch.setattr(engine, "prefill", real_prefill)
            monkeypatch.setattr(engine, "step", slow)
            with ThreadPoolExecutor(16) as ex:
                codes = [
                    r.status_code
                    for r in ex.map(lambda i: complete(c, "t0", PROMPTS[i % 8], 20), range(16))
                ]
            assert 429 in codes and 504 in codes and set(codes) <= {200, 429, 504}
            monkeypatch.setattr(engine, "step", real_step)
            time.sleep(0.5)
            r = complete(c, "t2", PROMPTS[4], 7)
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == offline("t2", PROMPTS[4], 7)
            metrics = c.get("/metrics").text
    assert 'status="429"' in metrics and 'status="504"' in metrics


def test_a_disconnected_client_cancels_its_request(lm, monkeypatch):
    """Issue 30, 9: a non-streaming request whose client hangs up is cancelled (recorded as
    499) instead of holding its batch slot and queue place until it finishes."""
    _, base, pack, _ = lm
    with Server(pack, base, Limits(max_tokens=24, timeout_s=60)) as s:
        real_step = s.engine.step

        def slow(seqs, kv):
            time.sleep(0.2)
            return real_step(seqs, kv)

        monkeypatch.setattr(s.engine, "step", slow)
        with httpx.Client(base_url=s.url, timeout=0.5) as c, pytest.raises(httpx.TimeoutException):
            complete(c, "t0", PROMPTS[0], 24)  # 24 slow steps: the client gives up first
        with httpx.Client(base_url=s.url, timeout=30) as c:
            deadline = time.monotonic() + 10
            while 'status="499"' not in c.get("/metrics").text:
                assert time.monotonic() < deadline, "the abandoned request was never cancelled"
                time.sleep(0.1)
            while c.get("/health").json()["running"]:  # dropped at the scheduler's next step
                assert time.monotonic() < deadline, "the cancelled sequence kept running"
                time.sleep(0.1)


def test_a_failed_reload_keeps_the_old_tasks_serving(lm, tmp_path, offline):
    """Issue 30, 1: a served pack's task file corrupted on disk (its manifest touched, so the
    server reloads) is refused as a whole: the model stays patched with the previous tasks,
    which answer as before, and /health says degraded with the error. Clients keep asking
    all along (under load): none gets a 5xx."""
    import shutil
    import threading

    root, base, pack, fts = lm
    live = tmp_path / "live"
    shutil.copytree(pack, live)
    with (
        Server(live, base, Limits(max_tokens=24)) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        stop, codes = threading.Event(), []

        def load():
            with httpx.Client(base_url=s.url, timeout=60) as lc:
                while not stop.is_set():
                    codes.append(complete(lc, "t0", PROMPTS[2], 4).status_code)

        clients = [threading.Thread(target=load) for _ in range(3)]
        for t in clients:
            t.start()
        f = live / "tasks" / "t2.safetensors"
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0x80  # same size: every page the server may have mapped stays readable
        f.write_bytes(bytes(raw))
        os.utime(live / "manifest.json", ns=(time.time_ns(), time.time_ns() + 10**9))
        deadline = time.monotonic() + 30
        while (h := c.get("/health").json())["status"] == "ok":
            assert time.monotonic() < deadline, "the change was never picked up"
            time.sleep(0.1)
        assert h["status"] == "degraded" and "t2.safetensors" in h["reload_error"]
        assert h["tasks"] == ["t0", "t1", "t2"]
        for task in ("t0", "t1"):
            r = complete(c, task, PROMPTS[1], 6)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == offline(task, PROMPTS[1], 6)
        stop.set()
        for t in clients:
            t.join()
    assert codes and set(codes) == {200}, Counter(codes)
