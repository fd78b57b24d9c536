"""`qmerge serve --ray` end to end on a local Ray with 2 CPUs: one application, two replicas of
one thread, two packs on different bases (a causal LM, the default, and an encoder classifier
with task heads). Mixed-task answers equal offline generation, the malformed requests of
test_serve.py get the same 4xx, a task added on disk reaches every replica, and a replica
killed under load is restarted with every later request answered."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

import qmerge  # noqa: E402
from qmerge.serve import Limits  # noqa: E402
from qmerge.serve.ray import PackSpec, RayOptions, RayServer  # noqa: E402
from tests.nn import tiny  # noqa: E402
from tests.serve.lm import BAD_REQUESTS, PROMPTS, complete  # noqa: E402
from tests.serve.test_classify import BERT_SPECIALS  # noqa: E402

LIMITS = Limits(max_tokens=24, max_batch=8, timeout_s=30, max_request_bytes=1 << 20)


@pytest.fixture(scope="module")
def app(lm, tmp_path_factory):
    root, base, pack, _ = lm
    live = tmp_path_factory.mktemp("ray-live") / "pack"
    shutil.copytree(pack, live)  # tasks are added to this copy on disk
    croot = tmp_path_factory.mktemp("ray-bert")
    cbase, cfts = tiny.bert(croot)
    tiny.save_tokenizer(cbase, 80, BERT_SPECIALS)
    cpack = tiny.compress(cbase, cfts, croot / "pack", "sign", heads=("classifier.*",))
    broken = tmp_path_factory.mktemp("ray-broken")  # a directory, but no pack
    packs = [
        PackSpec("lm", str(live), str(base)),
        PackSpec("cls", str(cpack), str(cbase)),
        PackSpec("broken", str(broken), str(base)),
    ]
    options = RayOptions(replicas=2, threads=1, limits=LIMITS)
    with RayServer(packs, options, num_cpus=2) as s:
        yield s, live, cbase, cpack


def test_mixed_tasks_on_two_replicas_equal_offline_greedy(app, offline):
    s = app[0]
    routes = ["t0", "lm/t1", "t2", "base", "t0:0.5+t2:0.5"]
    cases = [(routes[i % len(routes)], PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(24)]
    with httpx.Client(base_url=s.url, timeout=60) as c:
        with ThreadPoolExecutor(12) as ex:
            got = list(ex.map(lambda a: complete(c, a[0], a[1], a[2]), cases))
        health = c.get("/health").json()
        metrics = _metrics_after(c, 24)
    for (route, prompt, n), r in zip(cases, got, strict=True):
        assert r.status_code == 200, r.text
        mix = {"t0": 0.5, "t2": 0.5} if "+" in route else route.removeprefix("lm/")
        assert r.json()["choices"][0]["text"] == offline(mix, prompt, n), (route, prompt)
        assert r.json()["model"] == route
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    for rep in health["replicas"]:
        assert rep["packs"]["lm"]["tasks"] == ["t0", "t1", "t2"]
    # every replica answered some of them, each in batches of several tasks
    assert len({replica for replica, _ in _answered(metrics)}) == 2
    assert metrics.count("# TYPE qmerge_requests_total counter") == 1


def _answered(metrics: str) -> list[tuple[str, int]]:
    """(replica, count) of each 200 counter in the ingress's merged /metrics."""
    return [
        (line.split('replica="')[1].split('"')[0], int(float(line.split()[-1])))
        for line in metrics.splitlines()
        if line.startswith("qmerge_requests_total{") and 'status="200"' in line
    ]


def _health_until(c, ok) -> dict:
    """/health once `ok(health)` holds (replicas report every second), or after 15 s."""
    deadline = time.monotonic() + 15
    while True:
        health = c.get("/health").json()
        if ok(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.3)


def _metrics_after(c, n: int) -> str:
    """/metrics once the replicas' reports (every second) count at least n answers."""
    deadline = time.monotonic() + 15
    while True:
        text = c.get("/metrics").text
        if sum(k for _, k in _answered(text)) >= n or time.monotonic() > deadline:
            return text
        time.sleep(0.3)


def test_stream_through_ray_equals_non_stream(app):
    s = app[0]
    body = {"model": "t1", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    with httpx.Client(base_url=s.url, timeout=60) as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    import json

    parts = [json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]]
    assert "".join(parts) == whole


def test_two_packs_with_different_bases_in_one_application(app):
    from qmerge.verbs import run as inference

    s, _, cbase, cpack = app
    texts = ["the cat sat", "red blue", "a dog ran fast"]
    with httpx.Client(base_url=s.url, timeout=60) as c:
        got = [
            c.post("/v1/classify", json={"model": f"cls/{t}", "input": texts}) for t in ("c0", "c2")
        ]
        lm = complete(c, "t0", PROMPTS[1], 6)
        wrong = complete(c, "cls/c0", PROMPTS[1], 6)
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        health = _health_until(c, lambda h: any("cls" in r["packs"] for r in h["replicas"]))
    assert all(r.status_code == 200 for r in got), got[0].text
    ref = inference.run(cpack, cbase, [{"text": x, "task": t} for t in ("c0", "c2") for x in texts])
    data = [d for r in got for d in r.json()["data"]]
    assert [d["label"] for d in data] == [x["label"] for x in ref["results"]]
    for d, x in zip(data, ref["results"], strict=True):
        assert d["scores"] == pytest.approx(x["scores"], abs=1e-5)
    assert got[0].json()["model"] == "cls/c0"
    assert lm.status_code == 200
    assert wrong.status_code == 400 and "classify" in wrong.json()["error"]["message"]
    assert {"t0", "base", "cls/c0", "cls/c1", "cls/c2", "cls/base"} <= set(ids)
    held = [r for r in health["replicas"] if "cls" in r["packs"]]
    assert held and held[0]["packs"]["cls"]["kind"] == "classify"


@pytest.mark.parametrize(("body", "status", "words"), BAD_REQUESTS)
def test_bad_requests_get_the_same_4xx_through_ray(app, body, status, words):
    r = httpx.post(app[0].url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["code"] == status


def test_malformed_bodies_and_limits_through_ray(app):
    with httpx.Client(base_url=app[0].url, timeout=30) as c:
        r = c.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.post("/v1/completions", content=b"x" * (LIMITS.max_request_bytes + 1))
        assert r.status_code == 413 and "max-request-bytes" in r.json()["error"]["message"]
        assert c.get("/v1/nothing").status_code == 404
        r = complete(c, "nopack/t0", PROMPTS[0])  # not a pack: a task name of the default pack
        assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
        r = complete(c, "broken/t0", PROMPTS[0])
        assert (
            r.status_code == 503 and "'broken' could not be loaded" in r.json()["error"]["message"]
        )
        assert complete(c, "t0", PROMPTS[0], 4).status_code == 200  # still serving


def test_task_added_on_disk_reaches_every_replica(app, lm):
    s, live = app[0], app[1]
    base, fts = lm[1], lm[3]
    qmerge.add_task(
        live,
        base,
        {"t3": fts["t3"]},
        opts=qmerge.Options(policy=qmerge.Policy(codec="sign"), progress=False),
    )
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=s.url, timeout=60) as c:
        while not all(
            "t3" in r["packs"]["lm"]["tasks"] for r in c.get("/health").json()["replicas"]
        ):
            assert time.monotonic() < deadline, "a replica never picked up the added task"
            time.sleep(0.2)
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: complete(c, "t3", p, 6), PROMPTS[:6]))
    assert all(r.status_code == 200 for r in got)
    from qmerge.verbs.run import tokenizer

    model, tok = qmerge.load(base, live), tokenizer(base)
    enc = tok(PROMPTS[0], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, task="t3", pad_token_id=0)
    want = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got[0].json()["choices"][0]["text"] == want


def test_a_replica_killed_under_load_is_restarted(app, offline):
    """SIGKILL one replica while 4 clients send requests: the requests in flight either
    succeed (sent again to the other replica) or get 503, none hangs; once the replica is
    back, every request succeeds with the offline answer."""
    s = app[0]
    before = {r["replica"]: r["pid"] for r in s.health()["replicas"]}
    statuses: list[int] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            while not stop.is_set():
                statuses.append(complete(c, "t0", PROMPTS[k], 8).status_code)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    os.kill(next(iter(before.values())), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        now = {r["replica"] for r in s.health()["replicas"]}
        if len(now) == 2 and now != set(before):
            break
        assert time.monotonic() < deadline, "the killed replica was not restarted"
        time.sleep(0.5)
    stop.set()
    for w in workers:
        w.join(timeout=90)
        assert not w.is_alive(), "a client hung"
    assert statuses and set(statuses) <= {200, 503}, statuses
    with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(8) as ex:
        after = list(ex.map(lambda p: complete(c, "t1", p, 6), PROMPTS))
    for p, r in zip(PROMPTS, after, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline("t1", p, 6)


def _cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmerge", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_cli_refuses_bad_ray_flags_before_starting_ray(lm, tmp_path):
    _, base, pack, _ = lm
    r = _cli(str(pack), "--base", str(base), "--replicas", "2")
    assert r.returncode == 1 and "--replicas needs --ray" in r.stderr
    r = _cli(str(pack), "--base", str(base), "--ray", "--pack", "code=only-a-dir")
    assert r.returncode == 1 and "NAME=PACK_DIR,BASE_DIR" in r.stderr
    r = _cli(str(pack), "--base", str(base), "--ray", "--pack", f"x={tmp_path / 'no'},{base}")
    assert r.returncode == 1 and "pack 'x'" in r.stderr and "is not a directory" in r.stderr
    r = _cli(str(pack), "--base", str(base), "--ray", "--min-replicas", "3", "--max-replicas", "2")
    assert r.returncode == 1 and "--max-replicas" in r.stderr


@pytest.mark.slow
def test_cli_serve_ray_on_one_machine(lm):
    """`qmerge serve --ray PACK --base DIR` starts a local Ray, answers, and stops on Ctrl-C."""
    _, base, pack, _ = lm
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmerge", "serve", "--ray", str(pack), "--base", str(base)]
        + ["--port", str(port), "--max-tokens", "24"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("serving pack on Ray Serve" in x for x in lines):  # start() returned
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.3)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert complete(c, "pack/t0", PROMPTS[0], 4).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        reader.join(timeout=10)
    assert any("shutting down" in x for x in lines), "".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
