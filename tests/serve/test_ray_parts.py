"""The parts of `serve --ray` that need no Ray: which pack a body names, merging the replicas'
metrics, a pack held by a replica (load, answer in process, evict), and the in-process ASGI
call."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from qmerge.serve import Limits  # noqa: E402
from qmerge.serve.asgi import Call, Head, call_app  # noqa: E402
from qmerge.serve.ray_ingress import merge_metrics, pack_of  # noqa: E402
from qmerge.serve.ray_replica import Local, PackSpec, ReplicaConfig  # noqa: E402

PACKS = ("lm", "cls", "code")


@pytest.mark.parametrize(
    ("body", "pack"),
    [
        (b'{"model": "cls/c0", "input": "x"}', "cls"),
        (b'{"model": "code/a:0.7+b:0.3"}', "code"),
        (b'{"model": "lm/t0"}', None),  # the default pack
        (b'{"model": "t0"}', None),
        (b'{"model": "nopack/t0"}', None),  # not a pack: the default pack's app answers 404
        (b'{"model": 3}', None),
        (b"[1, 2]", None),
        (b"{not json", None),
        (b"\xff\xfe", None),
    ],
)
def test_pack_of_a_body(body, pack):
    assert pack_of(body, PACKS) == pack


def test_merged_metrics_label_every_sample_and_keep_one_help_per_family():
    one = (
        "# HELP a_total A.\n# TYPE a_total counter\n"
        'a_total{task="t0"} 3\n# HELP g G.\n# TYPE g gauge\ng 1\n'
    )
    two = '# HELP a_total A.\n# TYPE a_total counter\na_total{task="t1"} 4\n# TYPE g gauge\ng 2\n'
    text = merge_metrics([({"replica": "r1", "pack": "lm"}, one), ({"replica": "r2"}, two)])
    assert text.splitlines() == [
        "# HELP a_total A.",
        "# TYPE a_total counter",
        'a_total{replica="r1",pack="lm",task="t0"} 3',
        'a_total{replica="r2",task="t1"} 4',
        "# HELP g G.",
        "# TYPE g gauge",
        'g{replica="r1",pack="lm"} 1',
        'g{replica="r2"} 2',
    ]


def test_a_pack_in_a_replica_answers_in_process_and_stops_when_evicted(lm):
    _, base, pack, _ = lm
    local = Local(PackSpec("lm", str(pack), str(base)), ReplicaConfig((), Limits(max_tokens=24)))

    async def ask(call: Call) -> tuple[Head, bytes]:
        items = [x async for x in call_app(local.app, call)]
        return items[0], b"".join(items[1:])

    body = b'{"model": "lm/t1", "prompt": "the cat", "max_tokens": 4, "temperature": 0}'
    head, out = asyncio.run(
        ask(Call("POST", "/v1/completions", "", (("content-type", "application/json"),), body))
    )
    assert head.status == 200 and b'"model":"lm/t1"' in out and b'"completion_tokens":4' in out
    head, out = asyncio.run(ask(Call("GET", "/nothing")))
    assert head.status == 404
    info = local.info()
    assert info["status"] == "ok" and info["tasks"] == ["t0", "t1", "t2"]
    local.__del__()  # what Ray Serve's multiplexer calls when it evicts the pack
    assert not local.alive() and local.info()["status"] == "down"
