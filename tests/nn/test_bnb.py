"""A base quantized with bitsandbytes: the quantized layers run as they are, deltas on top."""

from __future__ import annotations

import pytest
import torch

import qmerge
from qmerge.nn import DeltaLinear
from tests.nn import tiny

transformers = pytest.importorskip("transformers")


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or no backend for this platform
        pytest.skip(f"bitsandbytes unavailable: {e}")
    try:
        lin = torch.nn.Linear(16, 8)
        q = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
        q.load_state_dict(lin.state_dict())
        q(torch.randn(2, 16))
    except Exception as e:
        pytest.skip(f"bitsandbytes has no 8-bit backend on this device: {e}")
    return bnb


def _quantize(model, bnb, bits):
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and ".layers." in f".{name}":
            if bits == 8:
                q = bnb.nn.Linear8bitLt(
                    mod.in_features, mod.out_features, mod.bias is not None, has_fp16_weights=False
                )
                q.load_state_dict(mod.state_dict())
            else:
                q = bnb.nn.Linear4bit(
                    mod.in_features,
                    mod.out_features,
                    mod.bias is not None,
                    compute_dtype=torch.float32,
                )
                q.load_state_dict(mod.state_dict())
                q = q.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_loads_and_routes(tmp_path, bits):
    bnb = _bnb()
    base, fts = tiny.llama(tmp_path)
    pack = tiny.compress(base, fts, tmp_path / "pack", "sign")
    ids = torch.tensor([[5, 9, 3, 17, 22, 8], [40, 4, 4, 12, 30, 1], [7, 7, 19, 2, 61, 33]])
    fp = qmerge.load(base, pack, mode="fused")
    try:
        q = _quantize(transformers.AutoModelForCausalLM.from_pretrained(base).eval(), bnb, bits)
        q(input_ids=ids)
    except Exception as e:
        pytest.skip(f"bitsandbytes {bits}-bit has no backend on this device: {e}")
    qmerge.load(q, pack, check_base="shapes")
    wrapped = [m for m in q.modules() if isinstance(m, DeltaLinear) and not m.plain]
    assert wrapped, "no quantized layer was wrapped"
    route = ["t1", "t0", "base"]
    with torch.no_grad():
        got = q(input_ids=ids, task=route).logits
        want = fp(input_ids=ids, task=route).logits
        for i, t in enumerate(route):  # rows are independent on the quantized base too
            torch.testing.assert_close(
                got[i], q(input_ids=ids[i : i + 1], task=t).logits[0], rtol=1e-4, atol=1e-4
            )
    # quantization error only: the deltas are applied exactly on top
    err = (got - want).abs().max() / want.abs().max()
    assert err < (0.05 if bits == 8 else 0.25), float(err)
    qmerge.unload(q)
    assert not any(isinstance(m, DeltaLinear) for m in q.modules())


def test_load_by_path_quantized_8bit(tmp_path):
    """qmerge.load(path, pack, quantize='8bit'): transformers quantizes the base on load."""
    _bnb()
    pytest.importorskip("accelerate")  # transformers needs it for quantization_config
    base, fts = tiny.llama(tmp_path)
    pack = tiny.compress(base, fts, tmp_path / "pack", "sign")
    q = qmerge.load(base, pack, quantize="8bit")
    assert any(isinstance(m, DeltaLinear) and not m.plain for m in q.modules())
    fp = qmerge.load(base, pack)
    ids = torch.tensor([[5, 9, 3, 17]])
    with torch.no_grad():
        got = q(input_ids=ids, task="t1").logits
        want = fp(input_ids=ids, task="t1").logits
    assert float((got - want).abs().max() / want.abs().max()) < 0.05
