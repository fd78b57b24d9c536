"""PEFT LoRA adapters as tasks: the routed pack answers like `PeftModel` (merged and not),
stores the adapter's factors (no dense delta), and refuses what it cannot apply exactly."""

from __future__ import annotations

import json

import pytest
import torch

import qmerge
from qmerge.errors import CheckpointError
from qmerge.format.safetensors_io import SafetensorsFile
from tests.nn import tiny

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[5, 9, 3, 17, 22, 8], [40, 4, 4, 12, 30, 1], [7, 7, 19, 2, 61, 33]])

# (name, LoraConfig keywords): ranks, alphas, rslora, target sets, patterns, whole modules
CONFIGS = [
    ("r4", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("r8rs", dict(r=8, lora_alpha=5, use_rslora=True, target_modules="all-linear")),
    ("r2emb", dict(r=2, lora_alpha=3, target_modules=["embed_tokens", "down_proj", "o_proj"])),
    (
        "pattern",
        dict(
            r=4,
            lora_alpha=4,
            target_modules=["k_proj", "up_proj", "gate_proj"],
            rank_pattern={"up_proj": 6},
            alpha_pattern={"layers.1.mlp.gate_proj": 7},
            modules_to_save=["lm_head"],
        ),
    ),
]


def _adapter(base, out, seed, dtype=torch.float32, **kw):
    """A PEFT adapter of `base` with random (non-zero) A and B, saved at `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    pm = get_peft_model(m, LoraConfig(**kw), autocast_adapter_dtype=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, _ = tiny.llama(root, tasks=0, tie=False)
    adapters = {n: _adapter(base, root / n, i, **kw) for i, (n, kw) in enumerate(CONFIGS)}
    pack = root / "pack"
    qmerge.compress(base, adapters, pack, opts=qmerge.Options(progress=False))
    return root, base, adapters, pack


def _peft(base, adapter, merged=False):
    from peft import PeftModel

    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = PeftModel.from_pretrained(m, adapter).eval()
    return pm.merge_and_unload().eval() if merged else pm


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_routed_pack_answers_like_peft_model_merged_and_not(lm):
    root, base, adapters, pack = lm
    model = qmerge.load(base, pack)
    names = list(adapters)
    with torch.no_grad():
        for t in names:
            y = model(input_ids=IDS, task=t).logits
            for merged in (False, True):
                ref = _peft(base, adapters[t], merged)(input_ids=IDS).logits
                assert _rel(y, ref) <= 1e-5, (t, merged, _rel(y, ref))
        mixed = model(input_ids=IDS, task=names[:3]).logits
        for i, t in enumerate(names[:3]):
            ref = _peft(base, adapters[t])(input_ids=IDS[i : i + 1]).logits[0]
            assert _rel(mixed[i], ref) <= 1e-5


def test_adapted_modules_store_the_factors_not_a_dense_delta(lm):
    root, base, adapters, pack = lm
    pk = qmerge.open_pack(pack)
    for t, path in adapters.items():
        ad = SafetensorsFile(path / "adapter_model.safetensors")
        lora_bytes = sum(ad.get(k).numel() * 4 for k in ad.keys() if "lora_" in k)
        entries = pk.entries(t)
        low = {n: e for n, e in entries.items() if e["codec"] == "lowrank"}
        assert low and all(e["sqnr_db"] is None for e in low.values())  # exact
        assert sum(e["bytes"] for e in low.values()) == lora_bytes
        assert pk.manifest["tasks"][t]["adapter"]["peft_type"] == "LORA"
    # the rank pattern gave up_proj rank 6, the rest rank 4
    e = pk.entries("pattern")
    assert e["model.layers.0.mlp.up_proj.weight"]["info"]["rank"] == 6
    assert e["model.layers.0.mlp.gate_proj.weight"]["info"]["rank"] == 4
    assert e["lm_head.weight"]["codec"] == "dense"  # a saved module: its delta, exact


def test_bf16_adapter_is_stored_in_bf16_with_the_scale_folded_in(lm, tmp_path):
    root, base, _, _ = lm
    ad = _adapter(
        base,
        tmp_path / "bf16",
        7,
        dtype=torch.bfloat16,
        r=4,
        lora_alpha=16,
        target_modules=["q_proj"],
    )
    out = qmerge.compress(base, {"b": ad}, tmp_path / "p", opts=qmerge.Options(progress=False))
    name = "model.layers.0.self_attn.q_proj.weight"
    res = qmerge.residual(out, "b", name)
    assert res.U.dtype == torch.bfloat16
    f = SafetensorsFile(ad / "adapter_model.safetensors")
    key = "base_model.model." + name.removesuffix(".weight")
    B, A = f.get(key + ".lora_B.weight"), f.get(key + ".lora_A.weight")
    assert torch.equal(res.U, B * 4) and torch.equal(res.V, A)  # s = 16 / 4, exact


def test_policy_encodes_the_product_when_asked(lm, tmp_path):
    root, base, adapters, _ = lm
    opts = qmerge.Options(adapter_as="policy", progress=False)
    out = qmerge.compress(base, {"r4": adapters["r4"]}, tmp_path / "p", opts=opts)
    assert {e["codec"] for e in out.entries("r4").values()} == {"sign"}
    out = qmerge.compress(base, {"p": adapters["pattern"]}, tmp_path / "q", opts=opts)
    assert out.entries("p")["lm_head.weight"]["codec"] == "sign"


def test_fifty_tiny_adapters_in_one_pack(lm, tmp_path):
    root, base, _, _ = lm
    one = _adapter(base, tmp_path / "one", 3, r=2, lora_alpha=2, target_modules=["q_proj"])
    out = qmerge.compress(
        base, {f"a{i}": one for i in range(50)}, tmp_path / "p", opts=qmerge.Options(progress=False)
    )
    assert len(out.tasks) == 50
    model = qmerge.load(base, out)
    with torch.no_grad():
        y = model(input_ids=IDS, task=["a0", "a25", "a49"]).logits
    ref = _peft(base, one)(input_ids=IDS).logits
    assert _rel(y, ref) <= 1e-5


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "'IA3' adapter"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias='all'"),
        ({"r": 0}, "r must be"),
    ],
)
def test_adapters_qmerge_cannot_apply_exactly_are_refused(lm, tmp_path, changes, message):
    root, base, adapters, _ = lm
    bad = _edit_config(adapters["r4"], tmp_path / "bad", **changes)
    with pytest.raises(CheckpointError, match=message):
        qmerge.compress(base, {"x": bad}, tmp_path / "p", opts=qmerge.Options(progress=False))
    assert not (tmp_path / "p").exists()


def test_adapter_of_another_base_is_refused_naming_the_mismatch(lm, tmp_path):
    from transformers import LlamaForCausalLM

    root, base, adapters, _ = lm
    cfg = tiny.llama_config(tie=False)
    cfg.intermediate_size = 96
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    ad = _adapter(
        tmp_path / "wide", tmp_path / "ad", 1, r=2, lora_alpha=2, target_modules=["up_proj"]
    )
    with pytest.raises(CheckpointError, match=r"up_proj' \(linear\) changes a \[96, 32\]"):
        qmerge.compress(base, {"x": ad}, tmp_path / "p", opts=qmerge.Options(progress=False))
    # same shapes, other values: base_model_name_or_path resolves locally and differs
    other = tiny.perturbed(LlamaForCausalLM.from_pretrained(base), 5)
    other.save_pretrained(tmp_path / "other")
    ad2 = _adapter(
        tmp_path / "other", tmp_path / "ad2", 1, r=2, lora_alpha=2, target_modules=["q_proj"]
    )
    with pytest.raises(CheckpointError, match="was trained on .* differs from the base's"):
        qmerge.compress(base, {"x": ad2}, tmp_path / "p", opts=qmerge.Options(progress=False))


def test_cli_takes_adapters_beside_fine_tunes(lm, tmp_path, capsys):
    from qmerge.cli import main

    root, base, adapters, _ = lm
    ft = tiny.perturbed(transformers.AutoModelForCausalLM.from_pretrained(base), 9)
    ft.save_pretrained(tmp_path / "ft")
    argv = ["compress", "--base", base, "--task", f"a={adapters['r4']}", "--task"]
    argv += [f"f={tmp_path / 'ft'}", "--out", tmp_path / "p", "--json"]
    assert main([str(a) for a in argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"a", "f"}
    pk = qmerge.open_pack(tmp_path / "p")
    assert {e["codec"] for e in pk.entries("a").values()} == {"lowrank"}
    assert "sign" in {e["codec"] for e in pk.entries("f").values()}


def test_add_task_takes_an_adapter_and_the_cli_refuses_lossless_with_a_codec(lm, tmp_path):
    from qmerge.cli import main

    root, base, adapters, _ = lm
    pack = qmerge.compress(
        base, {"a": adapters["r4"]}, tmp_path / "p", opts=qmerge.Options(progress=False)
    )
    qmerge.add_task(pack.path, base, {"b": adapters["r2emb"]}, opts=qmerge.Options(progress=False))
    assert qmerge.open_pack(tmp_path / "p").tasks == ["a", "b"]
    argv = ["compress", "--base", base, "--task", f"a={adapters['r4']}", "--lossless"]
    argv += ["--codec", "sign:granularity=tensor", "--out", tmp_path / "q"]
    assert main([str(a) for a in argv]) == 1
    assert not (tmp_path / "q").exists()
