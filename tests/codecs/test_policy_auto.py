import pytest
import torch

from qmerge.codecs import (
    AutoConfig,
    DenseConfig,
    DenseResidual,
    Policy,
    SkipResidual,
    choose,
    module_type,
    sqnr_db,
)
from qmerge.codecs.policy import resolve
from qmerge.errors import ConfigError


@pytest.mark.parametrize(
    "name,kind",
    [
        ("model.layers.3.self_attn.q_proj.weight", "attention"),
        ("model.layers.3.self_attn.o_proj.weight", "attention"),
        ("encoder.layer.0.attention.self.query.weight", "attention"),
        ("encoder.layer.0.attention.output.dense.weight", "attention"),
        ("transformer.h.0.attn.c_attn.weight", "attention"),
        ("model.layers.3.mlp.gate_proj.weight", "mlp"),
        ("encoder.layer.0.intermediate.dense.weight", "mlp"),
        ("encoder.layer.0.output.dense.weight", "mlp"),
        ("model.embed_tokens.weight", "embedding"),
        ("embeddings.position_embeddings.weight", "embedding"),
        ("lm_head.weight", "embedding"),
        ("model.layers.3.input_layernorm.weight", "norm"),
        ("encoder.layer.0.attention.output.LayerNorm.bias", "norm"),
        ("model.norm.weight", "norm"),
        ("transformer.ln_f.weight", "norm"),
        ("pooler.dense.weight", "other"),
    ],
)
def test_module_types(name, kind):
    assert module_type(name) == kind


def test_policy_resolution_order():
    p = Policy(
        codec="sign",
        types={"mlp": "lowrank:rank=8", "norm": "dense:dtype=fp16"},
        vectors="dense:dtype=fp32",
        patterns={"lm_head.*": "dense"},
        tasks={"chat": {"types": {"attention": "lowrank"}, "patterns": {"*.o_proj.*": "skip"}}},
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    assert p.spec_for("math", q, 2) == ("attention", resolve("sign"))
    assert p.spec_for("chat", q, 2) == ("attention", resolve("lowrank"))
    assert p.spec_for("chat", "model.layers.0.self_attn.o_proj.weight", 2)[1] == resolve("skip")
    assert p.spec_for("math", "model.layers.0.mlp.up_proj.weight", 2)[1] == resolve(
        "lowrank:rank=8"
    )
    assert p.spec_for("math", "lm_head.weight", 2)[1] == resolve("dense")
    assert p.spec_for("math", "model.norm.weight", 1)[1] == resolve("dense:dtype=fp16")
    assert p.spec_for("math", "model.layers.0.self_attn.q_proj.bias", 1)[1] == resolve(
        "dense:dtype=fp32"
    )


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"codec": "signs"}, "unknown codec"),
        ({"types": {"mlps": "sign"}}, "unknown module type"),
        ({"types": {"mlp": "lowrank:rank=-1"}}, "rank"),
        ({"colour": "blue"}, "unknown key"),
        ({"tasks": {"a": {"codec": "sign"}}}, "may only hold"),
        ({"skip_below": -1}, "skip_below"),
    ],
)
def test_bad_policies_name_the_problem(bad, match):
    with pytest.raises(ConfigError, match=match):
        Policy.from_dict(bad)


def test_auto_picks_the_cheapest_codec_that_meets_the_target():
    lowrank = torch.randn(64, 2) @ torch.randn(2, 48) * 0.01
    res, cfg, db = choose(lowrank, AutoConfig(sqnr_db=20))
    assert res.codec == "lowrank" and res.rank <= 3 and db >= 20
    gaussian = torch.randn(64, 48) * 0.01
    res, cfg, db = choose(gaussian, AutoConfig(sqnr_db=3))
    assert res.codec == "sign" and cfg.granularity == "tensor" and db >= 3
    res, cfg, db = choose(gaussian, AutoConfig(sqnr_db=40))
    assert db >= 40 and res.nbytes <= gaussian.numel() * 2  # never dearer than dense bf16
    res, cfg, db = choose(
        gaussian,
        AutoConfig(sqnr_db=40, candidates=("sign", "dense:dtype=fp16", "dense:dtype=fp32")),
    )
    assert isinstance(res, DenseResidual) and cfg == DenseConfig("fp16") and db >= 40
    res, cfg, db = choose(gaussian, AutoConfig(sqnr_db=200, candidates=("sign", "dense")))
    assert res.codec == "dense" and cfg == DenseConfig("bf16")  # none meets it: the best one


def test_skip_and_dense():
    d = torch.randn(5, 6)
    assert torch.equal(SkipResidual.from_dense(d, None).dequantize(), torch.zeros(5, 6))
    r = DenseResidual.from_dense(d, DenseConfig("fp32"))
    assert torch.equal(r.dequantize(), d)
    assert sqnr_db(float(d.pow(2).sum()), r.error_energy(d)) is None  # lossless
