"""Fixtures of the HTTP server tests: a tiny causal LM with a 3-task pack, a server on it,
and each task's offline greedy answer (what the server must reproduce)."""

from __future__ import annotations

import pytest
import torch

import qmerge
from tests.nn import tiny
from tests.serve.lm import LM_SPECIALS


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
    from qmerge.serve import Limits, Server

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
