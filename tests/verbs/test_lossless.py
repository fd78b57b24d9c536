"""compress --lossless: every tensor an fp32 delta that gives back its fine-tune bit for bit,
and a delta fp32 cannot hold refused."""

import pytest
import torch

import qmerge
from qmerge.errors import CheckpointError
from tests.models import base_tensors, finetune_of, save


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lossless_pack_gives_back_every_fine_tune_bit_for_bit(tmp_path, dtype):
    b = {n: t.to(dtype) for n, t in base_tensors().items()}
    save(b, tmp_path / "base")
    fts = {}
    for i in range(2):  # every tensor changed, norms and biases included
        ft = {n: t.to(dtype) for n, t in finetune_of(base_tensors(), i, frozen=()).items()}
        fts[f"t{i}"] = save(ft, tmp_path / f"ft{i}")
    opts = qmerge.Options(lossless=True, progress=False)
    pack = qmerge.compress(tmp_path / "base", fts, tmp_path / "pack", opts=opts)
    for t, path in fts.items():
        ft = qmerge.format.checkpoint.Checkpoint(path)
        for n, base_t in b.items():
            assert pack.entries(t)[n]["codec"] == "dense"  # norms and biases too
            d = qmerge.residual(pack, t, n).dequantize(torch.float32)
            assert torch.equal((base_t.float() + d).to(dtype), ft.get(n)), (t, n)


def test_lossless_refuses_a_delta_fp32_cannot_hold(tmp_path):
    b = base_tensors()
    save(b, tmp_path / "base")
    ft = dict(b)
    w = b["model.layers.0.mlp.up_proj.weight"].clone()
    w[3, 5] = 3.0 * 2**-23 + 2**-40  # f - b needs bits fp32 does not have near 1
    ft["model.layers.0.mlp.up_proj.weight"] = w
    bb = dict(b)
    bb["model.layers.0.mlp.up_proj.weight"] = b["model.layers.0.mlp.up_proj.weight"].clone()
    bb["model.layers.0.mlp.up_proj.weight"][3, 5] = 1.0 + 2**-23
    save(bb, tmp_path / "base")
    save(ft, tmp_path / "ft")
    with pytest.raises(CheckpointError, match="up_proj.weight'.*does not give back"):
        qmerge.compress(
            tmp_path / "base",
            {"a": tmp_path / "ft"},
            tmp_path / "pack",
            opts=qmerge.Options(lossless=True, progress=False),
        )
    assert not (tmp_path / "pack").exists()
    with pytest.raises(qmerge.errors.ConfigError, match="give no policy"):
        qmerge.Options(lossless=True, policy=qmerge.Policy(codec="lowrank"))
