"""Scale distillation (BitDelta): after N steps the 1-bit model's outputs are closer to the
fine-tune's on the calibration texts than with the encoded scales; only scales change; the
manifest says so; a distillation without texts is refused before anything is written."""

from __future__ import annotations

import random

import pytest
import torch

import qmerge
from qmerge.errors import ConfigError
from qmerge.format.pack import Pack
from qmerge.verbs.calibrate import load_model
from qmerge.verbs.run import tokenizer
from tests.nn import tiny

transformers = pytest.importorskip("transformers")
SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base, fts = tiny.bert(root, labels=(3,))
    tiny.save_tokenizer(base, 80, SPECIALS)
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randrange(3, 9))) for _ in range(16)
    ]
    return base, fts, texts


def _gap(base, ft, pack: Pack, texts) -> float:
    """Mean squared gap between the fine-tune's last hidden state and the pack's model's."""
    tok = tokenizer(base)
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        want = load_model(base, weights=ft)(**enc).last_hidden_state
        model = load_model(base)
        qmerge.load(model, pack, check_base="shapes")
        got = model(**enc, task=pack.tasks[0]).last_hidden_state
    return float((got - want).pow(2)[mask].mean())


def test_distilled_scales_bring_the_outputs_closer(bert, tmp_path):
    base, fts, texts = bert
    opts = dict(policy=qmerge.Policy(codec="sign:scale_dtype=fp32"), progress=False)
    opts["heads"] = ("classifier.*",)
    plain = qmerge.compress(base, fts, tmp_path / "plain", opts=qmerge.Options(**opts))
    tuned = qmerge.compress(
        base,
        fts,
        tmp_path / "tuned",
        # random deltas (the tiny fine-tune is the base plus noise) leave scales little to win;
        # a larger step than the default gets a clear gap in few steps
        opts=qmerge.Options(calib_texts={"*": texts}, distill_steps=100, distill_lr=5e-2, **opts),
    )
    ft = next(iter(fts.values()))
    before, after = _gap(base, ft, plain, texts), _gap(base, ft, tuned, texts)
    assert after < 0.9 * before, (before, after)
    task = plain.tasks[0]
    changed = 0
    for n, e in plain.entries(task).items():
        t = tuned.entries(task)[n]
        if e["codec"] != "sign":
            torch.testing.assert_close(tuned.parts(task, n), plain.parts(task, n), rtol=0, atol=0)
            continue
        assert torch.equal(tuned.parts(task, n)["signs"], plain.parts(task, n)["signs"])
        same = torch.equal(tuned.parts(task, n)["scales"], plain.parts(task, n)["scales"])
        if t["info"].get("distilled") == 100:  # a linear layer's weight
            changed += not same
        else:  # a matrix that is no linear layer's weight (an embedding) is left as encoded
            assert same, n
    assert changed >= 12  # every linear weight's scales moved
    qmerge.verify(tmp_path / "tuned", base)


def test_distillation_without_texts_is_refused(bert, tmp_path):
    base, fts, _ = bert
    opts = qmerge.Options(distill_steps=5, progress=False, heads=("classifier.*",))
    with pytest.raises(ConfigError, match="needs --calib-texts"):
        qmerge.compress(base, fts, tmp_path / "x", opts=opts)
    assert not (tmp_path / "x").exists()
