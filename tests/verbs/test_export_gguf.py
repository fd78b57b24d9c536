"""GGUF exports (llama.cpp's model and LoRA files) and the vLLM-ready PEFT adapter, on tiny
Llamas. The files are read back with the gguf package's reader (names, shapes, types, values
within the quantization's error) always; the export's own check runs them in llama.cpp where
llama-cpp-python is installed (else in transformers' GGUF loader), and the llama.cpp tests
below are skipped without it."""

from __future__ import annotations

import json
import os

import pytest
import torch

import qmerge
from qmerge.errors import ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.verbs.export import check
from qmerge.verbs.export.adapter import VLLM_RANKS
from qmerge.verbs.export.gguf_arch import arch
from qmerge.verbs.export.merged import merged
from qmerge.verbs.export.selection import select
from qmerge.verbs.packs import open_pack
from tests.nn import tiny
from tests.verbs.test_export import LOWRANK, _touch_vectors

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
if os.environ.get("QMERGE_DISABLE_EXT") == "1":
    pytest.skip("export runs once, in the pass with the compiled kernels", allow_module_level=True)
LLAMA = check.llama_python() is not None
needs_llama = pytest.mark.skipif(
    not LLAMA, reason="llama-cpp-python is not installed (pip install 'qmerge[llama]')"
)
TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "rain falls on the hill"]


def _tokenizer(out) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) of 320 tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """(root, base, sign pack, low-rank pack) of a tied Llama with a tokenizer, its norms
    changed by the fine-tunes; and the same for an untied Llama without one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    cfg = tiny.llama_config(tie=True).to_dict() | {"vocab_size": 320}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.save_pretrained(root / "base")
    _tokenizer(root / "base")
    fts = {}
    for i in range(2):
        tiny.perturbed(model, 300 + i).save_pretrained(root / f"ft{i}")
        _touch_vectors(root / f"ft{i}", 70 + i)
        fts[f"t{i}"] = root / f"ft{i}"
        model.load_state_dict(LlamaForCausalLM.from_pretrained(root / "base").state_dict())
    sign = tiny.compress(root / "base", fts, root / "sign")
    lowrank = tiny.compress(root / "base", fts, root / "lowrank", codec=LOWRANK)
    ubase, ufts = tiny.llama(root / "untied", tasks=2, tie=False)
    ulow = tiny.compress(ubase, ufts, root / "untied" / "lowrank", codec=LOWRANK)
    return root, root / "base", sign, lowrank, ubase, ulow


def _reader(path):
    r = gguf.GGUFReader(path)
    fields = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _values(t) -> torch.Tensor:
    data = gguf.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(data.copy()).float().reshape([int(x) for x in reversed(t.shape)])


@pytest.mark.parametrize(
    "gtype, bound",
    [
        ("f32", 0.0),
        ("q8_0", 1 / 127),
        ("q8_0:output=q8_0", 1 / 127),
        ("q4_1", 1 / 15),
        ("q4_0", 1 / 7),
    ],
)
def test_gguf_round_trip(llm, gtype, bound):
    root, base, sign, *_ = llm
    r = qmerge.export(
        sign, base, root / f"g-{gtype}", fmt="gguf", task="t0", gguf_type=gtype, texts=TEXTS
    )
    assert r["check"]["passed"] and r["check"]["runtime"] in check.runtime("gguf")[2]
    if gtype == "f32":
        assert r["check"]["exact"] and r["check"]["max_rel"] <= 1e-3
    fields, tensors = _reader(root / f"g-{gtype}" / "model.gguf")
    cfg = json.loads((base / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # every merged tensor is there, renamed, Q/K rows in llama.cpp's order, within the
    # quantization's error (q8_0: half a step of max/127 per block of 32; q4_0: of max/7;
    # q4_1: of (max - min)/15), in the type asked (the tied embedding a step above)
    want_types = {"q8_0": ("Q8_0", "F16"), "q4_1": ("Q4_1", "Q8_0"), "q4_0": ("Q4_0", "Q8_0")}
    mat, emb = want_types.get(gtype, (gtype.upper(), gtype.upper()))
    if gtype == "q8_0:output=q8_0":
        mat, emb = "Q8_0", "Q8_0"
    pk = open_pack(sign, base=base)
    sel, ckpt, a = select(pk, task="t0"), Checkpoint(base), arch(cfg)
    for name in ckpt.names:
        want = a.reorder_rows(name, merged(pk, ckpt, sel, name))
        t = tensors[a.rename(name)]
        got = _values(t)
        assert got.shape == want.shape, name
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
        else:
            assert t.tensor_type.name == (emb if "embed" in name else mat), name
        err = float((got - want).abs().max())
        if gtype == "f32":
            assert err == 0.0, name
        else:
            assert err <= bound * float(want.abs().max()) + 1e-7, (name, err)
    # the tokenizer: tokens in id order, merges, special ids, the GPT-2 split
    tok = json.loads((base / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert all(tokens[i] == t for t, i in vocab) and len(tokens) == 320
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert fields["tokenizer.ggml.eos_token_id"] == tok["model"]["vocab"]["</s>"]


def test_gguf_lora_tied_carries_the_embedding_over_an_untied_base(llm):
    root, base, _, lowrank, *_ = llm
    r = qmerge.export(lowrank, base, root / "lora", fmt="gguf-lora", task="t1", gguf_type="f32")
    w = r["written"]
    assert r["check"]["passed"] and w["ranks"] == {4: 22}
    # base.gguf gets its own output layer, so the embedding's factors go on both sides
    _, base_tensors = _reader(root / "lora" / "base.gguf")
    assert "output.weight" in base_tensors and w["base_written"]["untied_output"]
    fields, tensors = _reader(root / "lora" / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0
    assert {"token_embd.weight.lora_a", "output.weight.lora_a"} <= set(tensors)
    # llama.cpp skips adapter norms: the changed norms are left out, and say how much
    assert w["left_out"] and all("norm" in n for n in w["left_out"]) and not w["exact"]
    _share_is(w, lowrank, base, "t1")


def test_gguf_lora_over_a_tied_base_leaves_the_embedding_out(llm):
    # llama.cpp would apply a token_embd adapter to the output tensor it shares, with the
    # embedding's layout, and abort: over a tied base GGUF the embedding stays out
    root, base, sign, lowrank, *_ = llm
    qmerge.export(sign, base, root / "tiedbase", fmt="gguf", task="t0", gguf_type="f32")
    r = qmerge.export(
        lowrank,
        base,
        root / "lora-tied",
        fmt="gguf-lora",
        task="t1",
        gguf_type="f32",
        gguf_base=root / "tiedbase" / "model.gguf",
        min_agreement=0.5,
    )
    w = r["written"]
    assert "model.embed_tokens.weight" in w["left_out"] and w["base_written"] is None
    _, tensors = _reader(root / "lora-tied" / "adapter.gguf")
    assert not {"token_embd.weight.lora_a", "output.weight.lora_a"} & set(tensors)
    _share_is(w, lowrank, base, "t1")


def _share_is(w: dict, pack, base, task: str) -> None:
    pk = open_pack(pack, base=base)
    sel, ckpt = select(pk, task=task), Checkpoint(base)
    e = {
        n: float((merged(pk, ckpt, sel, n) - ckpt.get(n)).double().pow(2).sum()) for n in ckpt.names
    }
    share = sum(e[n] for n in w["left_out"]) / sum(e.values())
    assert w["energy_left_out"] == pytest.approx(share, rel=1e-6)


def test_gguf_lora_untied_is_exact_and_reuses_a_base(llm):
    root, _, _, _, ubase, ulow = llm
    first = qmerge.export(ulow, ubase, root / "u0", fmt="gguf-lora", task="t0", gguf_type="f32")
    assert first["written"]["exact"] and first["check"]["max_rel"] <= 1e-3
    _, tensors = _reader(root / "u0" / "adapter.gguf")
    assert {"token_embd.weight.lora_a", "output.weight.lora_a"} <= set(tensors)
    r = qmerge.export(
        ulow,
        ubase,
        root / "u1",
        fmt="gguf-lora",
        task="t1",
        gguf_type="f32",
        gguf_base=root / "u0" / "base.gguf",
    )
    assert r["check"]["max_rel"] <= 1e-3 and not (root / "u1" / "base.gguf").exists()
    # a base GGUF of another model is refused, naming the first tensor that differs
    with pytest.raises(ConfigError, match="not a GGUF of this base"):
        qmerge.export(
            llm[3],
            llm[1],
            root / "wrong",
            fmt="gguf-lora",
            task="t0",
            gguf_base=root / "u0" / "base.gguf",
        )
    assert not (root / "wrong").exists()


def test_peft_for_vllm(llm):
    root, base, sign, lowrank, *_ = llm
    r = qmerge.export(lowrank, base, root / "vllm", fmt="peft", task="t0", target="vllm")
    cfg = json.loads((root / "vllm" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["bias"] == "none"
    assert cfg["r"] == 8 and cfg["r"] in VLLM_RANKS and not cfg["rank_pattern"]
    assert all("embed" not in m and "lm_head" not in m for m in cfg["target_modules"])
    w = r["written"]
    assert w["rank"] == 8 and 0 < w["energy_left_out"] < 1 and r["check"]["passed"]
    assert "model.embed_tokens.weight" in w["left_out"]
    # from the sign pack: SVD at rank 3, padded to vLLM's 8; the loss is counted too
    s = qmerge.export(
        sign, base, root / "vllm-svd", fmt="peft", task="t0", target="vllm", rank=3,
        min_agreement=0.3,
    )  # fmt: skip
    assert s["written"]["rank"] == 8 and s["written"]["energy_left_out"] > w["energy_left_out"]


def test_refusals(llm, tmp_path):
    root, base, sign, lowrank, *_ = llm
    bad = [
        (dict(fmt="hf", target="vllm"), "option of the peft format"),
        (dict(fmt="gguf", gguf_base=tmp_path / "x.gguf"), "gguf-lora"),
        (dict(fmt="gguf-lora", gguf_base=tmp_path / "x.gguf"), "no such file"),
        (dict(fmt="gguf", gguf_type="q2_k"), "gguf type must be one of"),
        (dict(fmt="gguf", gguf_type="q8_0:embed=f16"), "the one option is"),
        (dict(fmt="gguf", gguf_type="q8_0:output=q3"), "gguf type must be one of"),
        (dict(fmt="gguf-lora", gguf_type="q8_0"), "not q8_0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            qmerge.export(lowrank, base, tmp_path / "out", task="t0", **kw)
        assert not (tmp_path / "out").exists()


def test_gguf_refuses_a_classifier(tmp_path):
    base, fts = tiny.bert(tmp_path)
    pack = tiny.compress(base, fts, tmp_path / "p", heads=("classifier.*",))
    with pytest.raises(ConfigError, match="causal LMs"):
        qmerge.export(pack, base, tmp_path / "out", fmt="gguf", task="c0")


@needs_llama
def test_llama_cpp_runs_the_exports(llm):
    root, base, sign, _, ubase, ulow = llm
    r = qmerge.export(sign, base, root / "ll", fmt="gguf", task="t1", gguf_type="f32", texts=TEXTS)
    assert r["check"]["runtime"] == "llama.cpp" and r["check"]["max_rel"] <= 1e-3
    assert r["check"]["tokenizer_identical"] == f"{len(TEXTS)}/{len(TEXTS)}"
    lr = qmerge.export(ulow, ubase, root / "ll-lora", fmt="gguf-lora", task="t1", gguf_type="f32")
    assert lr["check"]["runtime"] == "llama.cpp" and lr["check"]["max_rel"] <= 1e-3


def test_cli_gguf(llm, capsys):
    from qmerge.cli import main

    root, base, sign, *_ = llm
    argv = ["export", str(sign), "--base", str(base), "--task", "t0", "--out"]
    assert (
        main([*argv, str(root / "cli"), "--format", "gguf", "--gguf-type", "q8_0", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    # 21 Linear weights in q8_0, the tied embedding (the output layer) in f16
    assert out["format"] == "gguf" and out["written"]["types"] == {"Q8_0": 21, "F16": 1, "F32": 7}
    assert main([*argv, str(root / "cli2"), "--format", "hf", "--target", "vllm"]) == 1
    assert "option of the peft format" in capsys.readouterr().err
