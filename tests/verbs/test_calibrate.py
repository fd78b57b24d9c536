"""Calibration from texts: the base's linear-layer inputs over calibration texts, with a row cap,
and `compress --calib-texts` giving the same scales as calibrating on the benchmark's own
collection of those inputs."""

from __future__ import annotations

import random

import pytest
import torch

import qmerge
from qmerge.cli import main
from qmerge.errors import ConfigError
from qmerge.format.pack import Pack
from qmerge.verbs.calibrate import layer_inputs
from tests.nn import tiny

transformers = pytest.importorskip("transformers")
SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
CALIBRATED = qmerge.Policy(codec="sign:calibrate=true,scale_dtype=fp32")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    base, fts = tiny.bert(root, labels=(3, 2))
    tiny.save_tokenizer(base, 80, SPECIALS)
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randrange(3, 9))) for _ in range(12)
    ]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return root, base, fts, texts


def test_layer_inputs_are_the_real_tokens_each_linear_sees(bert):
    root, base, fts, texts = bert
    got = layer_inputs(base, texts, batch_size=5)
    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(got) == linears
    tok = transformers.AutoTokenizer.from_pretrained(base)
    tokens = int(tok(texts, padding=True, return_tensors="pt")["attention_mask"].sum())
    name = "encoder.layer.1.intermediate.dense.weight"
    assert got[name].shape == (tokens, 32)
    capped = layer_inputs(base, texts, max_rows=7, batch_size=5)
    assert all(t.shape[0] == 7 for t in capped.values())
    torch.testing.assert_close(capped[name], got[name][:7])


def test_calib_texts_give_the_benchmarks_scales(bert, tmp_path):
    measure = pytest.importorskip("bench.quality.measure")
    root, base, fts, texts = bert
    # the benchmark's own collection: one forward over all texts, hooks on every nn.Linear
    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    enc = tok(texts, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].reshape(-1).bool()
    calib = measure.linear_inputs(model, lambda: model(**enc), keep)
    opts = dict(policy=CALIBRATED, heads=("classifier.*",), progress=False)
    a = qmerge.compress(base, fts, tmp_path / "a", opts=qmerge.Options(calib=calib, **opts))
    argv = [
        "compress",
        "--base",
        str(base),
        "--out",
        str(tmp_path / "b"),
        "--head",
        "classifier.*",
        "--codec",
        "sign:calibrate=true,scale_dtype=fp32",
        "--calib-texts",
        str(root / "texts.txt"),
        "--quiet",
        "--json",
    ]
    for t, p in fts.items():
        argv += ["--task", f"{t}={p}"]
    assert main(argv) == 0
    b = Pack.open(tmp_path / "b")
    calibrated = 0
    for task in a.tasks:
        for n, e in a.entries(task).items():
            if e["codec"] != "sign":
                continue
            assert b.entries(task)[n]["info"]["calibrated"] == e["info"]["calibrated"]
            calibrated += e["info"]["calibrated"]
            torch.testing.assert_close(
                b.parts(task, n)["scales"], a.parts(task, n)["scales"], rtol=1e-4, atol=1e-7
            )
    assert calibrated >= 2 * 12  # every linear weight of both tasks was calibrated


def test_calibration_refusals(bert, tmp_path):
    root, base, fts, texts = bert
    empty = root / "empty.txt"
    empty.write_text("\n")
    opts = qmerge.Options(
        policy=CALIBRATED, heads=("classifier.*",), progress=False, calib_texts={"*": empty}
    )
    with pytest.raises(ConfigError, match="is empty"):
        qmerge.compress(base, fts, tmp_path / "x", opts=opts)
    opts.calib_texts = {"zz": texts}
    with pytest.raises(ConfigError, match="task 'zz', which is not being compressed"):
        qmerge.compress(base, fts, tmp_path / "x", opts=opts)
    assert not (tmp_path / "x").exists()
