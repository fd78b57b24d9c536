"""`qmerge fit-router` and `qmerge run` end to end on tiny models with word-level tokenizers."""

from __future__ import annotations

import json

import pytest

from qmerge.cli import main
from tests.nn import tiny

pytest.importorskip("transformers")
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
LM_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}


@pytest.fixture(scope="module")
def cls_pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-bert")
    base, fts = tiny.bert(root)
    tiny.save_tokenizer(base, 80, BERT_SPECIALS)
    pack = tiny.compress(base, fts, root / "pack", "sign", heads=("classifier.*",))
    return root, base, pack


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_router_then_run_auto(cls_pack, capsys):
    root, base, pack = cls_pack
    files = {}
    for t, words in {
        "c0": "the cat sat on the mat",
        "c1": "red blue big small very",
        "c2": "is was not and or",
    }.items():
        f = root / f"{t}.txt"
        f.write_text("\n".join([words] * 3) + "\n")
        files[t] = f
    argv = ["fit-router", str(pack), "--base", str(base), "--layer", "2", "--json"]
    for t, f in files.items():
        argv += ["--examples", f"{t}={f}", "--eval", f"{t}={f}"]
    out = _json(capsys, argv)
    assert out["router"]["kind"] == "prototype" and out["router"]["examples"]["c1"] == 3
    assert out["evaluation"]["accuracy"] == 1.0
    assert out["evaluation"]["confusion"]["c2"]["c2"] == 3
    reqs = root / "reqs.jsonl"
    reqs.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "red blue big", "auto": True},
                {"text": "the cat sat", "task": "c0"},
                {"text": "is not", "coeffs": "c2:0.5+c2:0.5"},
                {"text": "the dog"},
            ]
        )
        + "\n"
    )
    res = _json(
        capsys,
        ["run", str(pack), "--base", str(base), "--jsonl", str(reqs), "--task", "c2", "--json"],
    )
    assert res["kind"] == "classify"
    r = res["results"]
    assert r[0]["route"] == {"c1": 1.0} and len(r[0]["scores"]) == 5
    assert r[1]["route"] == "c0" and len(r[1]["scores"]) == 3
    assert r[2]["route"] == "c2:0.5+c2:0.5" and len(r[2]["scores"]) == 2
    assert r[3]["route"] == "c2"  # the command's --task fills requests that name none
    for x in r:
        assert abs(sum(x["scores"].values()) - 1) < 1e-5


def test_run_generates_with_a_causal_lm(tmp_path, capsys):
    base, fts = tiny.llama(tmp_path, tasks=2)
    tiny.save_tokenizer(base, 64, LM_SPECIALS)
    pack = tiny.compress(base, fts, tmp_path / "pack", "sign")
    res = _json(
        capsys,
        [
            "run",
            str(pack),
            "--base",
            str(base),
            "--task",
            "t1",
            "--text",
            "the cat",
            "--text",
            "a big red dog",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert res["kind"] == "generate" and len(res["results"]) == 2
    assert all(isinstance(x["output"], str) for x in res["results"])
    assert main(["run", str(pack), "--base", str(base), "--task", "nope", "--text", "a"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["run", str(pack), "--base", str(base), "--auto", "--text", "a"]) == 1
    assert "has no router" in capsys.readouterr().err


def test_bad_request_file_names_the_line(cls_pack, tmp_path, capsys):
    root, base, pack = cls_pack
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    assert main(["run", str(pack), "--base", str(base), "--jsonl", str(bad)]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
