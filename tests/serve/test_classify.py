"""The HTTP server's classification side end to end: /v1/classify over task heads against
`qmerge run`, and a router fitted while serving answering model 'auto'."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import qmerge  # noqa: E402
from qmerge.serve import Limits, Server  # noqa: E402
from tests.nn import tiny  # noqa: E402

BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}


@pytest.fixture(scope="module")
def cls_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-bert")
    base, fts = tiny.bert(root)
    tiny.save_tokenizer(base, 80, BERT_SPECIALS)
    pack = tiny.compress(base, fts, root / "pack", "sign", heads=("classifier.*",))
    with Server(pack, base, Limits(max_batch=8)) as s:
        yield s, base, pack


def test_classify_mixed_tasks_equal_qmerge_run(cls_server):
    from qmerge.verbs import run as inference

    s, base, pack = cls_server
    texts = ["the cat sat", "red blue", "is not very big", "a dog ran fast"]
    with httpx.Client(base_url=s.url, timeout=60) as c:
        with ThreadPoolExecutor(6) as ex:
            got = list(
                ex.map(
                    lambda t: c.post("/v1/classify", json={"model": t, "input": texts}),
                    ["c0", "c1", "c2"],
                )
            )
        r = c.post("/v1/completions", json={"model": "c0", "prompt": "the cat"})
        assert r.status_code == 400 and "classify" in r.json()["error"]["message"]
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards["c1"]["labels"] == [f"label{k}" for k in range(5)]
    ref = inference.run(
        pack, base, [{"text": x, "task": t} for t in ("c0", "c1", "c2") for x in texts]
    )["results"]
    data = [d for r in got for d in r.json()["data"]]
    assert [d["label"] for d in data] == [x["label"] for x in ref]
    for d, x in zip(data, ref, strict=True):
        assert d["scores"] == pytest.approx(x["scores"], abs=1e-5)
        assert abs(sum(d["scores"].values()) - 1) < 1e-4


@pytest.mark.parametrize(
    "body, words",
    [
        # c0 has 3 labels, c1 has 5: their heads cannot be mixed
        ({"model": "c0:0.5+c1:0.5", "input": "the cat sat"}, "different numbers of outputs"),
        ({"model": "c0:1e39", "input": "the cat sat"}, "at most 1000"),
        ({"model": "c0", "input": ["the cat", "red \udcff blue"]}, "not valid Unicode"),
    ],
)
def test_client_faults_on_classify_are_400_and_the_others_are_answered(cls_server, body, words):
    """Issue 30, 7: each was a 500 (or a 200 with null scores) before."""
    s, _, _ = cls_server
    with httpx.Client(base_url=s.url, timeout=60) as c:
        content = json.dumps(body)  # json.dumps keeps a lone surrogate as its escape
        r = c.post("/v1/classify", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        ok = c.post("/v1/classify", json={"model": "c1", "input": "the cat sat"})
        assert ok.status_code == 200


def test_router_fitted_while_serving_makes_auto_answer(cls_server):
    """Fitting a router writes it into the pack; the server picks it up like a task change,
    and 'auto' then routes each text on its own."""
    from qmerge.verbs.run import tokenizer

    s, base, pack = cls_server
    with httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/classify", json={"model": "auto", "input": "the cat"})
        assert r.status_code == 400 and "router" in r.json()["error"]["message"]
        tok = tokenizer(base)
        model = qmerge.load(base, pack)
        examples = {
            "c0": ["the cat sat on the mat"] * 3,
            "c1": ["red blue big small"] * 3,
            "c2": ["is was not and or"] * 3,
        }
        qmerge.fit_router(
            model,
            examples,
            layer=2,
            encode=lambda x: dict(tok(list(x), return_tensors="pt", padding=True)),
        )
        deadline = time.monotonic() + 30
        while "auto" not in [m["id"] for m in c.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the router never appeared"
            time.sleep(0.1)
        r = c.post(
            "/v1/classify",
            json={
                "model": "auto",
                "input": ["the cat sat on the mat", "red blue big small", "is was not and or"],
            },
        )
    assert r.status_code == 200, r.text
    assert [d["route"] for d in r.json()["data"]] == [{"c0": 1.0}, {"c1": 1.0}, {"c2": 1.0}]
