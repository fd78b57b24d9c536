"""The HTTP server end to end: a real uvicorn server on a loopback port, real HTTP clients,
tiny models. Greedy answers are compared with the offline `generate` of each task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import qmerge  # noqa: E402
from qmerge.serve import Limits, Server  # noqa: E402
from tests.serve.lm import BAD_REQUESTS, PROMPTS, complete  # noqa: E402


def test_concurrent_mixed_tasks_equal_offline_greedy(server, offline):
    routes = ["t0", "t1", "t2", "base", "t0:0.5+t2:0.5"]
    cases = [(routes[i % len(routes)], PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(24)]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda a: complete(c, a[0], a[1], a[2]), cases))
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
        whole = complete(c, "t1", PROMPTS[0], 10).json()["choices"][0]["text"]
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
        full = complete(c, "t0", PROMPTS[6], 12).json()["choices"][0]["text"]
        words = full.split()
        assert len(words) > 2
        stop = words[2]
        cut = complete(c, "t0", PROMPTS[6], 12, stop=[stop, "zzz"]).json()["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(stop)]
        many = complete(c, "t0", [PROMPTS[0], PROMPTS[1]], 5).json()
        assert [ch["index"] for ch in many["choices"]] == [0, 1]
        assert (
            many["choices"][0]["text"]
            == complete(c, "t0", PROMPTS[0], 5).json()["choices"][0]["text"]
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


@pytest.mark.parametrize(("body", "status", "words"), BAD_REQUESTS)
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


def test_tasks_added_and_removed_without_restart(lm, tmp_path):
    root, base, pack, fts = lm
    import shutil

    live = tmp_path / "live"
    shutil.copytree(pack, live)
    with (
        Server(live, base, Limits(max_tokens=24)) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        assert complete(c, "t3", PROMPTS[0]).status_code == 404
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
        r = complete(c, "t3", PROMPTS[0], 8)
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
        r = complete(c, "t1", PROMPTS[0])
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        assert complete(c, "t3", PROMPTS[0]).status_code == 200
        assert c.get("/health").json()["reload_error"] is None


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
        r = complete(c, "t0", PROMPTS[2], 9)
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
