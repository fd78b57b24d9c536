"""Export: every format of tiny real transformers models, checked by the export itself (the
artifact in a fresh process without qmerge vs the routed model) and by these tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qmerge
from qmerge.errors import BaseMismatchError, ConfigError, ExportError
from qmerge.format.checkpoint import Checkpoint
from qmerge.verbs.export import build, check
from qmerge.verbs.export.merged import merged
from qmerge.verbs.export.selection import select
from tests.nn import tiny

transformers = pytest.importorskip("transformers")
if os.environ.get("QMERGE_DISABLE_EXT") == "1":
    # Export is Python over the pack and transformers; the routed reference it checks
    # against runs the ops, whose reference path tests/nn covers in this pass. Spawning the
    # check's processes again would add minutes for nothing new.
    pytest.skip("export runs once, in the pass with the compiled kernels", allow_module_level=True)
LOWRANK = qmerge.Policy(
    codec="lowrank:rank=4,factor_dtype=fp32",
    vectors="dense:dtype=fp32",
    types={"norm": "dense:dtype=fp32"},
)


def _touch_vectors(model_dir, seed: int) -> None:
    """Changes every bias and norm of a saved fine-tune (tiny.perturbed scales noise by each
    tensor's std, which leaves the constant-initialised ones as they were)."""
    from qmerge.format.safetensors_io import write_safetensors

    ckpt = Checkpoint(model_dir)
    g = torch.Generator().manual_seed(seed)
    state = {
        n: (
            t.clone() + 0.1 * torch.randn(t.shape, generator=g)
            if t.is_floating_point() and t.dim() == 1
            else t.clone()
        )
        for n, t in ckpt.items()
    }
    del ckpt
    with open(model_dir / "model.safetensors", "wb") as f:
        write_safetensors(f, state, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base, fts = tiny.llama(root, tasks=2)
    for i, d in enumerate(fts.values()):
        _touch_vectors(d, 50 + i)
    sign = tiny.compress(
        base,
        fts,
        root / "sign",
        codec=qmerge.Policy(codec="sign", types={"norm": "dense:dtype=fp32"}),
    )
    lowrank = tiny.compress(base, fts, root / "lowrank", codec=LOWRANK)
    return root, base, fts, sign, lowrank


@pytest.fixture(scope="module")
def cls(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base, fts = tiny.bert(root)
    for i, d in enumerate(fts.values()):
        _touch_vectors(d, 60 + i)
    lowrank = tiny.compress(base, fts, root / "lowrank", codec=LOWRANK, heads=("classifier.*",))
    return root, base, fts, lowrank


def _stray(root) -> list:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_hf_task_loads_without_qmerge_and_matches(lm):
    root, base, fts, sign, _ = lm
    r = qmerge.export(sign, base, root / "hf", fmt="hf", task="t0")
    c = r["check"]
    assert c["passed"] and c["exact"] and c["fresh_process_without_qmerge"]
    assert c["max_rel"] < 1e-5 and c["agreement"] == 1.0 and c["greedy_identical"] == "8/8"
    cfg = json.loads((root / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert json.loads((root / "hf" / build.REPORT).read_text())["selection"] == "task 't0'"
    # the export holds base + the pack's residuals (not the fine-tune: sign is lossy)
    m = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    ref = qmerge.load(base, sign)
    ids = torch.tensor([[1, 5, 9, 13, 40, 22]])
    with torch.no_grad():
        torch.testing.assert_close(
            m(input_ids=ids).logits, ref(input_ids=ids, task="t0").logits, rtol=1e-5, atol=1e-5
        )
        other = ref(input_ids=ids, task="t1").logits
    assert not torch.allclose(m(input_ids=ids).logits, other, atol=1e-3)
    assert _stray(root) == []


def test_hf_mixture_sharded_and_bf16(lm):
    root, base, fts, sign, _ = lm
    r = qmerge.export(
        sign, base, root / "mix", fmt="hf", coeffs="t0:0.7+t1:0.3", max_shard_bytes=40_000
    )
    assert (
        len(r["written"]["shards"]) > 1 and (root / "mix" / "model.safetensors.index.json").exists()
    )
    assert r["check"]["passed"] and r["check"]["max_rel"] < 1e-5
    assert r["route"] == {"coeffs": {"t0": 0.7, "t1": 0.3}}
    r = qmerge.export(sign, base, root / "bf16", fmt="hf", task="t1", dtype="bf16")
    assert not r["check"]["exact"] and r["check"]["agreement"] >= 0.9
    assert json.loads((root / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert r["sizes"]["export_bytes"] < 0.6 * r["sizes"]["base_fp32_bytes"]


def test_peft_lowrank_llama_is_exact_with_tied_embeddings(lm):
    root, base, fts, _, lowrank = lm
    r = qmerge.export(lowrank, base, root / "peft", fmt="peft", task="t1")
    assert r["written"]["exact"] and r["check"]["exact"] and r["check"]["max_rel"] < 1e-5
    cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert {"lm_head", "embed_tokens"} <= set(cfg["target_modules"]) or any(
        "lm_head" in m for m in cfg["target_modules"]
    )
    # norms changed, so the norm modules are carried whole
    assert any("norm" in m for m in cfg["modules_to_save"])


def test_peft_mixture_concatenates_factors(lm):
    root, base, fts, _, lowrank = lm
    r = qmerge.export(lowrank, base, root / "peftmix", fmt="peft", coeffs="t0:0.5+t1:-0.25")
    assert r["written"]["exact"] and r["check"]["max_rel"] < 1e-5
    assert r["written"]["ranks"] == {8: r["written"]["target_modules"]}


def test_peft_from_sign_is_svd_with_energy(lm):
    root, base, fts, sign, _ = lm
    r = qmerge.export(
        sign, base, root / "peftsvd", fmt="peft", task="t0", rank=3, min_agreement=0.5
    )
    w = r["written"]
    assert not w["exact"] and not r["check"]["exact"] and w["svd_tensors"] > 0
    assert 0.0 < w["energy_kept_min"] < 1.0


def test_peft_classifier_carries_heads_biases_and_norms(cls):
    root, base, fts, lowrank = cls
    r = qmerge.export(lowrank, base, root / "peft", fmt="peft", task="c1")
    assert r["check"]["exact"] and r["check"]["max_rel"] < 1e-5 and r["check"]["agreement"] == 1
    cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only"
    assert "classifier" in cfg["modules_to_save"]
    assert any("LayerNorm" in m for m in cfg["modules_to_save"])


def test_int8_is_small_and_loads_with_its_loader(lm, cls):
    root, base, fts, sign, _ = lm
    r = qmerge.export(sign, base, root / "int8", fmt="int8", task="t0")
    assert not r["check"]["exact"] and r["check"]["agreement"] >= 0.9
    assert (root / "int8" / "qmerge_int8.py").exists()
    from safetensors import safe_open

    with safe_open(str(root / "int8" / "model.int8.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        assert w.dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight.int8_scale").shape == (64,)
    hf = qmerge.export(sign, base, root / "int8ref", fmt="hf", task="t0")
    assert r["sizes"]["export_bytes"] < 0.45 * hf["sizes"]["export_bytes"]
    croot, cbase, _, clow = cls
    r = qmerge.export(clow, cbase, croot / "int8", fmt="int8", task="c0")
    assert r["check"]["agreement"] >= 0.9 and r["labels"] == ["label0", "label1", "label2"]


def test_onnx_classifier_runs_in_onnxruntime(cls):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root, base, fts, lowrank = cls
    r = qmerge.export(lowrank, base, root / "onnx", fmt="onnx", task="c2")
    assert r["check"]["exact"] and r["check"]["max_rel"] < 1e-4 and r["check"]["agreement"] == 1
    assert (root / "onnx" / "model.onnx").exists()


def test_a_wrong_artifact_fails_the_check_and_nothing_is_written(lm, monkeypatch):
    root, base, fts, sign, _ = lm
    real = build.FORMATS["hf"]

    def wrong(job, out):  # writes the other task's weights
        info = real(job.__class__(**{**job.__dict__, "sel": select(job.pack, task="t1")}), out)
        return info

    with (
        build.FORMATS.swapped("hf", wrong),
        pytest.raises(ExportError, match="does not match the routed model"),
    ):
        qmerge.export(sign, base, root / "wrong", fmt="hf", task="t0")
    assert not (root / "wrong").exists() and _stray(root) == []


def test_refusals_write_nothing(lm, cls, tmp_path):
    root, base, fts, sign, _ = lm
    croot, cbase, _, clow = cls
    cases = [
        (dict(pack=sign, base=cbase, task="t0"), BaseMismatchError, "different base|differ"),
        (dict(pack=sign, base=base, task="nope"), ConfigError, "unknown task 'nope'"),
        (dict(pack=sign, base=base), ConfigError, "exactly one of"),
        (dict(pack=sign, base=base, shared=True), ConfigError, "no shared delta"),
        (dict(pack=sign, base=base, task="t0", fmt="onnx", dtype="bf16"), ConfigError, "fp32"),
        (dict(pack=sign, base=base, task="t0", fmt="tflite"), ConfigError, "unknown export format"),
        (dict(pack=clow, base=cbase, coeffs="c0:0.5+c1:0.5"), ConfigError, "different shapes"),
        (dict(pack=clow, base=cbase, task="base"), ConfigError, "bare base has none"),
    ]
    for kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            qmerge.export(kw.pop("pack"), kw.pop("base"), tmp_path / "out", **kw)
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        qmerge.export(sign, base, tmp_path / "out", task="t0")
    assert _stray(tmp_path) == []


def test_merging_never_writes_into_the_mapped_pack(lm):
    root, base, fts, _, lowrank = lm
    pk = qmerge.open_pack(lowrank)
    ckpt = Checkpoint(base)
    sel = select(pk, task="t0")
    name = "model.norm.weight"
    assert pk.entries("t0")[name]["codec"] == "dense"
    first = merged(pk, ckpt, sel, name).clone()
    for _ in range(3):
        torch.testing.assert_close(merged(pk, ckpt, sel, name), first, rtol=0, atol=0)
    want = ckpt.get(name).float() + qmerge.residual(pk, "t0", name).dequantize()
    torch.testing.assert_close(first, want, rtol=0, atol=0)


def test_the_check_runs_without_qmerge(tmp_path):
    d = tmp_path / "fake"
    d.mkdir()
    (d / "qmerge_int8.py").write_text("import qmerge\n")
    spec = {"format": "int8", "dir": str(d), "kind": "classifier", "auto": "AutoModel", "eos": []}
    ref = {"seq.0": torch.tensor([1, 2, 3]), "prompt.0": torch.tensor(3)}
    with pytest.raises(ExportError, match="qmerge is blocked|blocked"):
        check.run_child(spec, ref, 1)


def test_cli_export_json(lm, capsys):
    from qmerge.cli import main

    root, base, fts, sign, _ = lm
    assert (
        main(
            [
                "export",
                str(sign),
                "--base",
                str(base),
                "--task",
                "t1",
                "--out",
                str(root / "cli"),
                "--format",
                "hf",
                "--json",
                "--check-inputs",
                "3",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["check"]["inputs"] == 3 and out["check"]["passed"]
    assert (
        main(["export", str(sign), "--base", str(base), "--task", "t1", "--out", str(root / "cli")])
        == 1
    )
    assert "exists" in capsys.readouterr().err
