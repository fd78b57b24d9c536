"""Calibration from texts: the linear-layer inputs over calibration texts (in each fine-tune, or
the base), with a row cap, and `compress --calib-texts` giving the same scales as calibrating on
a plain one-forward collection of those inputs."""

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


def _reference_inputs(model, texts) -> dict:
    """The plain way: one forward over all texts, a hook on every nn.Linear keeping its
    real-token input rows (what the quality benchmark collected before it used the public
    path)."""
    tok = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
    enc = tok(texts, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].reshape(-1).bool()
    seen = {}

    def hook(name):
        def fn(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[name] = x[keep] if x.shape[0] == keep.shape[0] else x  # the pooler: [CLS] rows

        return fn

    hooks = [
        m.register_forward_hook(hook(f"{n}.weight"))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return seen


def _compress_cli(base, fts, out, root, *extra) -> Pack:
    argv = ["compress", "--base", str(base), "--out", str(out), "--head", "classifier.*"]
    argv += ["--codec", "sign:calibrate=true,scale_dtype=fp32", "--quiet", "--json", *extra]
    argv += ["--calib-texts", str(root / "texts.txt")]
    for t, p in fts.items():
        argv += ["--task", f"{t}={p}"]
    assert main(argv) == 0
    return Pack.open(out)


@pytest.mark.parametrize("source", ["finetune", "base"])
def test_calib_texts_give_the_reference_scales(bert, tmp_path, source):
    root, base, fts, texts = bert
    opts = dict(policy=CALIBRATED, heads=("classifier.*",), progress=False)
    a = None
    for t, ft in fts.items():  # each task calibrated on the reference collection
        model = transformers.AutoModel.from_pretrained(
            ft if source == "finetune" else base, dtype=torch.float32
        ).eval()
        model.name_or_path = str(base)  # the base's tokenizer
        o = qmerge.Options(calib=_reference_inputs(model, texts), **opts)
        if a is None:
            a = qmerge.compress(base, {t: ft}, tmp_path / "a", opts=o)
        else:
            a = qmerge.add_task(tmp_path / "a", base, {t: ft}, opts=o)
    b = _compress_cli(base, fts, tmp_path / "b", root, "--calib-from", source)
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


def test_finetune_and_base_inputs_differ(bert, tmp_path):
    """The source matters: a fine-tune's layers see other inputs than the base's (else the
    test above could not tell the two apart)."""
    root, base, fts, texts = bert
    task, ft = next(iter(fts.items()))
    a = layer_inputs(base, texts)
    b = layer_inputs(base, texts, weights=ft)
    name = "encoder.layer.1.intermediate.dense.weight"
    assert a[name].shape == b[name].shape
    assert not torch.allclose(a[name], b[name])


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


def _refused(capsys, argv, out) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written
    return err


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty"),
        (b"\n  \n", "is empty"),
        (b"\xff\xfe\x00bad", "cannot read"),  # not UTF-8
        (b'{"text": ""}\n{"text": ""}\n', "tokenize to nothing"),
        (b'{"txt": "a"}\n', 'needs a string field "text"'),
    ],
)
def test_cli_refuses_bad_calibration_texts(bert, tmp_path, capsys, content, expected):
    root, base, fts, texts = bert
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    out = tmp_path / "pack"
    argv = ["compress", "--base", str(base), "--out", str(out), "--head", "classifier.*"]
    argv += ["--codec", "sign:calibrate=true", "--calib-texts", str(f), "--quiet"]
    for t, p in fts.items():
        argv += ["--task", f"{t}={p}"]
    assert expected in _refused(capsys, argv, out)


def test_cli_refuses_texts_for_a_task_not_compressed(bert, tmp_path, capsys):
    root, base, fts, texts = bert
    out = tmp_path / "pack"
    argv = ["compress", "--base", str(base), "--out", str(out), "--head", "classifier.*"]
    argv += ["--calib-texts", f"zz={root / 'texts.txt'}", "--quiet"]
    for t, p in fts.items():
        argv += ["--task", f"{t}={p}"]
    assert "task 'zz', which is not being compressed" in _refused(capsys, argv, out)


def test_refuses_a_model_without_linear_layers(bert, tmp_path, capsys, monkeypatch):
    from qmerge.verbs import calibrate

    root, base, fts, texts = bert
    monkeypatch.setattr(
        calibrate,
        "load_model",
        lambda base, weights=None: torch.nn.Sequential(torch.nn.Embedding(80, 8)),
    )
    out = tmp_path / "pack"
    argv = ["compress", "--base", str(base), "--out", str(out), "--head", "classifier.*"]
    argv += ["--codec", "sign:calibrate=true", "--calib-texts", str(root / "texts.txt"), "--quiet"]
    for t, p in fts.items():
        argv += ["--task", f"{t}={p}"]
    assert "has no linear layers to calibrate" in _refused(capsys, argv, out)


def test_causal_lm_head_inputs_without_its_logits(tmp_path):
    """An untied LM head's inputs are collected (the final hidden states) while its logits
    are never computed (the largest activation of a forward)."""
    base, fts = tiny.llama(tmp_path, tasks=1, tie=False)
    tiny.save_tokenizer(base, 64, {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3})
    rng = random.Random(1)
    texts = [" ".join(rng.choice(tiny.WORDS) for _ in range(rng.randrange(2, 7))) for _ in range(6)]
    got = layer_inputs(base, texts, batch_size=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc, output_hidden_states=True).hidden_states[-1]
    want = h.reshape(-1, h.shape[-1])[enc["attention_mask"].reshape(-1).bool()]
    torch.testing.assert_close(got["lm_head.weight"], want, rtol=1e-4, atol=1e-5)
