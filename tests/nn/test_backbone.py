"""A merged pack's shared delta goes into the model's weights only when it is finite, and comes
out again bit for bit."""

from __future__ import annotations

import pytest
import torch

import qmerge
from qmerge.codecs import DenseResidual
from qmerge.errors import ConfigError
from qmerge.nn.backbone import Backbone
from qmerge.verbs.packs import shared_residual
from tests.nn import tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone")
    base, fts = tiny.llama(root, tasks=2)
    pack = tiny.compress(base, fts, root / "pack", tiny.EXACT)
    out = qmerge.merge_pack(
        pack, root / "ta", "task_arithmetic:scale=0.5", shared_codec="dense:dtype=fp32"
    )
    return base, out


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_non_finite_shared_delta_is_refused_before_any_weight_changes(merged):
    base, pack = merged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    before = _weights(model)
    names = sorted(pack.shared_entries())
    bad = names[len(names) // 2]  # some tensors are added before the bad one is reached

    def shared(name: str):
        d = shared_residual(pack, name).dequantize().clone()
        if name == bad:
            d.view(-1)[3] = float("nan")
        return DenseResidual(d)

    with pytest.raises(ConfigError, match="not finite"):
        Backbone().add(model, pack, shared)
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)

    # a finite one goes in, and restore takes it out bit for bit
    bb = Backbone()
    bb.add(model, pack, lambda n: shared_residual(pack, n))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    bb.restore()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
