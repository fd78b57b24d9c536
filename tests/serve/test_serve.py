"""The HTTP server end to end: a real uvicorn server on a loopback port, real HTTP clients,
tiny models. Greedy answers are compared with the offline `generate` of each task."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import qmerge  # noqa: E402
from qmerge.serve import Limits, Server  # noqa: E402
from tests.nn import tiny  # noqa: E402

LM_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
PROMPTS = [
    "the cat sat on",
    "a dog ran",
    "red blue big",
    "the mat was very",
    "small cat is not",
    "slow and fast",
    "a big red dog sat on the",
    "is",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-lm")
    base, fts = tiny.llama(root, tasks=4)
    tiny.save_tokenizer(base, 64, LM_SPECIALS)
    pack = tiny.compress(base, {t: fts[t] for t in ("t0", "t1", "t2")}, root / "pack", "sign")
    return root, base, pack, fts


@pytest.fixture(scope="module")
def server(lm):
    _, base, pack, _ = lm
    with Server(pack, base, Limits(max_tokens=24, max_batch=8, timeout_s=30)) as s:
        yield s


@pytest.fixture(scope="module")
def offline(lm):
    """Greedy completions of each task, each prompt alone through the patched model's own
    generate (the answer the server must reproduce)."""
    _, base, pack, _ = lm
    from qmerge.verbs.run import tokenizer

    model = qmerge.load(base, pack)

    tok = tokenizer(base)

    def answer(task, prompt: str, n: int) -> str:
        enc = tok(prompt, return_tensors="pt")
        kw = {"coeffs": task} if isinstance(task, dict) else {"task": task}
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **kw
            )
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def _complete(client, model: str, prompt, n: int = 12, **kw) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **kw},
    )


def test_concurrent_mixed_tasks_equal_offline_greedy(server, offline):
    routes = ["t0", "t1", "t2", "base", "t0:0.5+t2:0.5"]
    cases = [(routes[i % len(routes)], PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(24)]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda a: _complete(c, a[0], a[1], a[2]), cases))
        metrics = c.get("/metrics").text
    for (route, prompt, n), r in zip(cases, got, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        mix = {"t0": 0.5, "t2": 0.5} if "+" in route else route
        assert body["choices"][0]["text"] == offline(mix, prompt, n), (route, prompt)
        assert body["model"] == route and body["usage"]["completion_tokens"] <= n
    # requests of different tasks shared decoding steps
    sizes = [
        line
        for line in metrics.splitlines()
        if line.startswith('qmerge_batch_size_bucket{phase="decode",le="1"}')
    ]
    total = [
        line
        for line in metrics.splitlines()
        if line.startswith('qmerge_batch_size_count{phase="decode"}')
    ]
    assert sizes and total and int(sizes[0].split()[-1]) < int(total[0].split()[-1])


def test_stream_equals_non_stream(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        whole = _complete(c, "t1", PROMPTS[0], 10).json()["choices"][0]["text"]
        parts, finish = [], None
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "model": "t1",
                "prompt": PROMPTS[0],
                "max_tokens": 10,
                "temperature": 0,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [x for x in r.iter_lines() if x]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            ch = json.loads(line.removeprefix("data: "))["choices"][0]
            parts.append(ch["text"])
            finish = ch["finish_reason"] or finish
        assert "".join(parts) == whole and finish == "length"
        assert len([p for p in parts if p]) > 1  # it did stream, token by token
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": "t2",
                "messages": [{"role": "user", "content": "the cat"}],
                "max_tokens": 6,
                "temperature": 0,
            },
        ).json()
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "t2",
                "messages": [{"role": "user", "content": "the cat"}],
                "max_tokens": 6,
                "temperature": 0,
                "stream": True,
            },
        ) as r:
            chunks = [
                json.loads(x.removeprefix("data: "))
                for x in r.iter_lines()
                if x and x != "data: [DONE]"
            ]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[0]["object"] == "chat.completion.chunk"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == chat["choices"][0]["message"]["content"]
    assert chat["object"] == "chat.completion"


def test_stop_strings_sampling_and_prompt_lists(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        full = _complete(c, "t0", PROMPTS[6], 12).json()["choices"][0]["text"]
        words = full.split()
        assert len(words) > 2
        stop = words[2]
        cut = _complete(c, "t0", PROMPTS[6], 12, stop=[stop, "zzz"]).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(stop)]
        many = _complete(c, "t0", [PROMPTS[0], PROMPTS[1]], 5).json()
        assert [ch["index"] for ch in many["choices"]] == [0, 1]
        assert (
            many["choices"][0]["text"]
            == _complete(c, "t0", PROMPTS[0], 5).json()["choices"][0]["text"]
        )
        sample = {
            "model": "t1",
            "prompt": PROMPTS[2],
            "max_tokens": 8,
            "temperature": 1.5,
            "top_p": 0.9,
            "seed": 7,
        }
        a = c.post("/v1/completions", json=sample).json()["choices"][0]["text"]
        b = c.post("/v1/completions", json=sample).json()["choices"][0]["text"]
        assert a == b  # a seed makes sampling reproducible


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "prompt": "the cat"}, 404, "does not exist"),
        ({"model": "t0:0.5+zz:0.5", "prompt": "the cat"}, 404, "'zz' does not exist"),
        ({"model": "t0:x+t1:0.5", "prompt": "the cat"}, 400, "is not a number"),
        ({"model": "auto", "prompt": "the cat"}, 400, "has none"),
        ({"model": "t0", "prompt": "the cat", "max_tokens": 1000}, 400, "at most 24"),
        ({"model": "t0", "prompt": "the cat", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "t0", "prompt": "the cat", "stop": [""]}, 400, "non-empty"),
        ({"model": "t0", "prompt": "the cat", "temperature": -1}, 400, "temperature"),
        ({"model": "t0", "prompt": ""}, 400, "empty"),
        ({"model": "t0", "prompt": []}, 400, "at least one"),
        ({"model": "t0"}, 400, "prompt"),
        ({"prompt": "the cat"}, 400, "model"),
        # issue 30: hostile values are client errors, refused before any work
        ({"model": "t0:1e39", "prompt": "the cat"}, 400, "at most 1000"),
        ({"model": "t0:1e308+t0:1e308", "prompt": "the cat"}, 400, "at most 1000"),
        ({"model": "t0", "prompt": "cat " * 40_000}, 400, "characters"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, body, status, words):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == status


def test_malformed_json_wrong_endpoint_and_health(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"model": "t0", "input": "the cat"})
        assert r.status_code == 400 and "task heads" in r.json()["error"]["message"]
        assert c.get("/v1/nothing").status_code == 404
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["tasks"] == ["t0", "t1", "t2"]
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["t0", "t1", "t2", "base"]
        spec = c.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/models"} <= set(
            spec["paths"]
        )


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
                got = list(ex.map(lambda p: _complete(c, "t1", p, 6), prompts))
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
                    for r in ex.map(lambda i: _complete(c, "t0", PROMPTS[i % 8], 20), range(16))
                ]
            assert 429 in codes and 504 in codes and set(codes) <= {200, 429, 504}
            monkeypatch.setattr(engine, "step", real_step)
            time.sleep(0.5)
            r = _complete(c, "t2", PROMPTS[4], 7)
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
            _complete(c, "t0", PROMPTS[0], 24)  # 24 slow steps: the client gives up first
        with httpx.Client(base_url=s.url, timeout=30) as c:
            deadline = time.monotonic() + 10
            while 'status="499"' not in c.get("/metrics").text:
                assert time.monotonic() < deadline, "the abandoned request was never cancelled"
                time.sleep(0.1)
            while c.get("/health").json()["running"]:  # dropped at the scheduler's next step
                assert time.monotonic() < deadline, "the cancelled sequence kept running"
                time.sleep(0.1)


def test_tasks_added_and_removed_without_restart(lm, tmp_path):
    root, base, pack, fts = lm
    import shutil

    live = tmp_path / "live"
    shutil.copytree(pack, live)
    with (
        Server(live, base, Limits(max_tokens=24)) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        assert _complete(c, "t3", PROMPTS[0]).status_code == 404
        qmerge.add_task(
            live,
            base,
            {"t3": fts["t3"]},
            opts=qmerge.Options(policy=qmerge.Policy(codec="sign"), progress=False),
        )
        deadline = time.monotonic() + 30
        while "t3" not in [m["id"] for m in c.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the added task never appeared"
            time.sleep(0.1)
        r = _complete(c, "t3", PROMPTS[0], 8)
        assert r.status_code == 200
        ref = qmerge.load(base, live)
        from qmerge.verbs.run import tokenizer

        tok = tokenizer(base)
        enc = tok(PROMPTS[0], return_tensors="pt")
        out = ref.generate(
            **enc, max_new_tokens=8, do_sample=False, task="t3", pad_token_id=tok.pad_token_id
        )
        assert r.json()["choices"][0]["text"] == tok.decode(
            out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        qmerge.remove_task(live, ["t1"])
        while "t1" in [m["id"] for m in c.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline + 30, "the removed task never left"
            time.sleep(0.1)
        r = _complete(c, "t1", PROMPTS[0])
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        assert _complete(c, "t3", PROMPTS[0]).status_code == 200
        assert c.get("/health").json()["reload_error"] is None


def test_a_failed_reload_keeps_the_old_tasks_serving(lm, tmp_path, offline):
    """Issue 30, 1: a served pack's task file corrupted on disk (its manifest touched, so the
    server reloads) is refused as a whole: the model stays patched with the previous tasks,
    which answer as before, and /health says degraded with the error."""
    import shutil

    root, base, pack, fts = lm
    live = tmp_path / "live"
    shutil.copytree(pack, live)
    with (
        Server(live, base, Limits(max_tokens=24)) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
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
            r = _complete(c, task, PROMPTS[1], 6)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == offline(task, PROMPTS[1], 6)


def test_fuzz_the_openapi_spec(server, offline):
    """Requests generated from the server's own OpenAPI spec, valid and invalid (schemathesis
    positive and negative modes): none may get a 5xx, and the server answers correctly
    afterwards. QMERGE_FUZZ_EXAMPLES sets how many (bench/results/serve.md records 1000)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 6
    cases = st.one_of(
        [
            op.as_strategy(mode)
            for op in ops
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    n = int(os.environ.get("QMERGE_FUZZ_EXAMPLES", "60"))
    seen: list[int] = []

    @given(case=cases)
    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        r = case.call(base_url=server.url, timeout=30)
        seen.append(r.status_code)
        assert r.status_code < 500, (case.method, case.path, case.body, r.text)

    fuzz()
    assert len(seen) >= n // 2 and any(400 <= c < 500 for c in seen)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = _complete(c, "t0", PROMPTS[2], 9)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline(
            "t0", PROMPTS[2], 9
        )


def test_cli_serve(lm, tmp_path):
    _, base, pack, _ = lm
    out = subprocess.run(
        [sys.executable, "-m", "qmerge", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--batch-window-ms" in out.stdout
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmerge",
            "serve",
            str(pack),
            "--base",
            str(base),
            "--port",
            str(port),
            "--max-batch",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert r.json()["tasks"] == ["t0", "t1", "t2"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "qmerge", "serve", str(tmp_path / "nopack"), "--base", str(base)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert bad.returncode == 1 and "nopack" in bad.stderr
