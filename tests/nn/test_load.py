"""qmerge.load on transformers models: routed forward and generate equal the fine-tunes (or
their merged models), mixed batches equal each task alone, unload restores the base."""

from __future__ import annotations

import threading

import pytest
import torch

import qmerge
from qmerge.errors import BaseMismatchError, ConfigError
from qmerge.nn import DeltaLinear
from tests.nn import tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    base, fts = tiny.llama(root)
    return root, base, fts


def _pack(lm, codec, name):
    root, base, fts = lm
    out = root / name
    if not out.exists():
        tiny.compress(base, fts, out, codec)
    return out


def _ft(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _merged_model(base, pack_path, task, coeffs=None):
    """The task's (or mixture's) merged model built the slow, obvious way: base + dequantized
    residual per tensor, loaded into a fresh transformers model."""
    pk = qmerge.open_pack(pack_path)
    m = _ft(base)
    weights = coeffs or {task: 1.0}
    state = m.state_dict()
    with torch.no_grad():
        for name in state:
            for t, w in weights.items():
                if name in pk.entries(t):
                    d = qmerge.residual(pk, t, name).dequantize(torch.float32)
                    state[name] += w * d.reshape(state[name].shape)
    m.load_state_dict(state)
    return m


IDS = torch.tensor(
    [[5, 9, 3, 17, 22, 8], [40, 4, 4, 12, 30, 1], [7, 7, 19, 2, 61, 33], [11, 3, 5, 8, 13, 21]]
)


def test_dense_pack_reproduces_every_fine_tune(lm):
    root, base, fts = lm
    model = qmerge.load(base, _pack(lm, tiny.EXACT, "exact"))
    names = list(fts)
    with torch.no_grad():
        y = model(input_ids=IDS[:3], task=names).logits
        for i, t in enumerate(names):
            ref = _ft(fts[t])(input_ids=IDS[i : i + 1]).logits[0]
            torch.testing.assert_close(y[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codec", ["sign", "lowrank:rank=4"])
def test_mixed_batch_equals_each_task_alone_and_the_merged_model(lm, codec):
    root, base, fts = lm
    pack = _pack(lm, codec, codec.split(":")[0])
    model = qmerge.load(base, pack, mode="fused")
    route = ["t0", "t2", "base", "t1"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, task=route).logits
        for i, t in enumerate(route):
            alone = model(input_ids=IDS[i : i + 1], task=t).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
            ref = _ft(base) if t == "base" else _merged_model(base, pack, t)
            torch.testing.assert_close(
                mixed[i], ref(input_ids=IDS[i : i + 1]).logits[0], rtol=1e-4, atol=1e-4
            )


def test_fused_and_materialized_agree_and_the_cache_is_used(lm):
    root, base, fts = lm
    pack = _pack(lm, "sign", "sign")
    model = qmerge.load(base, pack, mode="fused")
    with torch.no_grad():
        fused = model(input_ids=IDS, task="t1").logits
        model.qmerge.set_mode("materialized")
        mat = model(input_ids=IDS, task="t1").logits
        again = model(input_ids=IDS, task="t1").logits
    torch.testing.assert_close(fused, mat, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.argmax(-1), mat.argmax(-1))
    assert torch.equal(mat, again)
    stats = model.qmerge.runtime.cache.stats()
    assert stats["entries"] > 0 and stats["hits"] >= stats["entries"]


def test_auto_mode_materializes_large_uniform_batches_only(lm):
    root, base, fts = lm
    model = qmerge.load(base, _pack(lm, "sign", "sign"), mode="auto", min_rows=20)
    with torch.no_grad():
        model(input_ids=IDS[:2], task="t0")  # 12 rows: fused
        assert model.qmerge.runtime.cache.stats()["entries"] == 0
        model(input_ids=IDS, task=["t0", "t1", "t0", "t0"])  # mixed: fused
        assert model.qmerge.runtime.cache.stats()["entries"] == 0
        model(input_ids=IDS, task="t0")  # 24 rows of one task: merged
        assert model.qmerge.runtime.cache.stats()["entries"] > 0


def test_cache_stays_within_its_byte_bound(lm):
    root, base, fts = lm
    bound = 40_000
    model = qmerge.load(base, _pack(lm, "sign", "sign"), mode="materialized", cache_bytes=bound)
    with torch.no_grad():
        for t in ["t0", "t1", "t2", "t0", "t2"]:
            model(input_ids=IDS, task=t)
            assert model.qmerge.runtime.cache.stats()["bytes"] <= bound
    s = model.qmerge.runtime.cache.stats()
    assert s["evictions"] > 0 and s["entries"] > 0


def test_mixture_equals_the_merged_mixture(lm):
    root, base, fts = lm
    pack = _pack(lm, "sign", "sign")
    model = qmerge.load(base, pack, mode="fused")
    mix = {"t0": 0.7, "t2": 0.3}
    with torch.no_grad():
        y = model(input_ids=IDS[:2], coeffs=[mix, "t1"]).logits
        ref = _merged_model(base, pack, None, mix)(input_ids=IDS[:1]).logits[0]
    torch.testing.assert_close(y[0], ref, rtol=1e-4, atol=1e-4)


def test_per_token_coeffs_equal_per_sequence_when_constant(lm):
    root, base, fts = lm
    model = qmerge.load(base, _pack(lm, "sign", "sign"), mode="fused")
    c = torch.zeros(2, IDS.shape[1], 3)
    c[0, :, 1] = 1
    c[1, :, 2] = 0.5
    with torch.no_grad():
        tok = model(input_ids=IDS[:2], coeffs=c, per_token=True).logits
        seq = model(input_ids=IDS[:2], coeffs=["t1", {"t2": 0.5}]).logits
    torch.testing.assert_close(tok, seq, rtol=1e-5, atol=1e-5)


def test_generate_mixed_batch_equals_each_merged_model(lm):
    root, base, fts = lm
    pack = _pack(lm, "sign", "sign")
    model = qmerge.load(base, pack)
    prompts = IDS[:, :4]
    mask = torch.ones_like(prompts)
    route = ["t2", "t0", "t1", "t0"]
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=mask,
            task=route,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
        with model.qmerge.route(task=route):  # the context manager, for code without kwargs
            out2 = model.generate(
                prompts, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        for i, t in enumerate(route):
            ref = _merged_model(base, pack, t).generate(
                prompts[i : i + 1],
                attention_mask=mask[i : i + 1],
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )
            n = ref.shape[1]  # a sequence that hit EOS early is padded in the batch
            assert out[i, :n].tolist() == ref[0].tolist(), t
            assert (out[i, n:] == 0).all()
    assert torch.equal(out, out2)


def test_beam_search_and_several_returns_keep_each_sequence_on_its_task(lm):
    root, base, fts = lm
    pack = _pack(lm, "sign", "sign")
    model = qmerge.load(base, pack)
    prompts = IDS[:2, :4]
    kw = dict(
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=5,
        do_sample=False,
        num_beams=3,
        num_return_sequences=2,
        pad_token_id=0,
    )
    with torch.no_grad():
        out = model.generate(prompts, task=["t1", "t2"], **kw)
        for i, t in enumerate(["t1", "t2"]):
            kwi = kw | {"attention_mask": kw["attention_mask"][i : i + 1]}
            ref = _merged_model(base, pack, t).generate(prompts[i : i + 1], **kwi)
            got = out[2 * i : 2 * i + 2, : ref.shape[1]]
            assert got.tolist() == ref.tolist(), t


def test_threads_with_different_tasks_equal_sequential_calls(lm):
    root, base, fts = lm
    model = qmerge.load(base, _pack(lm, "sign", "sign"), min_rows=10)
    jobs = [
        ("t0", IDS[:1]),
        ("t1", IDS),
        ("t2", IDS[1:3]),
        (["t0", "t2"], IDS[2:]),
        ("base", IDS),
        ({"t0": 0.5, "t1": 0.5}, IDS[:2]),
    ] * 3
    with torch.no_grad():

        def call(spec, ids):
            if isinstance(spec, dict):
                return model(input_ids=ids, coeffs=spec).logits
            return model(input_ids=ids, task=spec).logits

        want = [call(s, x) for s, x in jobs]
        got: list = [None] * len(jobs)
        errors: list = []

        def run(k):
            try:
                for _ in range(3):
                    got[k] = call(*jobs[k])
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)


def test_unload_restores_the_base_bit_for_bit(lm):
    root, base, fts = lm
    model = _ft(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    qmerge.load(model, _pack(lm, "sign", "sign"))
    assert any(isinstance(m, DeltaLinear) for m in model.modules())
    with torch.no_grad():
        model(input_ids=IDS, task="t1")
    qmerge.unload(model)
    assert not hasattr(model, "qmerge") and "forward" not in model.__dict__
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is modules[k] for k in modules)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, want)


def test_refusals(lm, tmp_path):
    root, base, fts = lm
    pack = _pack(lm, "sign", "sign")
    model = qmerge.load(base, pack)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        model(input_ids=IDS, task="nope")
    with pytest.raises(ConfigError, match="already patched"):
        qmerge.load(model, pack)
    with pytest.raises(ConfigError, match="has no router"):
        model(input_ids=IDS, router=True)
    other = _ft(fts["t0"])  # a fine-tune is not the base
    with pytest.raises(BaseMismatchError, match="different values"):
        qmerge.load(other, pack)
    with pytest.raises(ConfigError, match="not patched"):
        qmerge.unload(other)


class Plain(torch.nn.Module):
    """Not a transformers model: the tensor names of tests/models.py, nothing else."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(40, 16)
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.q_proj = torch.nn.Linear(16, 16)
        layer.mlp = torch.nn.Module()
        layer.mlp.up_proj = torch.nn.Linear(16, 48, bias=False)
        layer.mlp.down_proj = torch.nn.Linear(48, 16, bias=False)
        layer.input_layernorm = torch.nn.RMSNorm(16)
        self.model.layers = torch.nn.ModuleList([layer])
        self.model.norm = torch.nn.RMSNorm(16)

    def forward(self, input_ids):
        h = self.model.embed_tokens(input_ids)
        layer = self.model.layers[0]
        h = h + layer.self_attn.q_proj(layer.input_layernorm(h))
        h = h + layer.mlp.down_proj(torch.relu(layer.mlp.up_proj(h)))
        return self.model.norm(h)


def test_plain_module_by_names_with_biases_norms_and_embeddings(models):
    from qmerge.format.checkpoint import Checkpoint

    pack = tiny.compress(
        models / "base", {f"t{i}": models / f"ft{i}" for i in range(3)}, models / "pack", tiny.EXACT
    )

    def build(path):
        net = Plain()
        ck = Checkpoint(path)
        net.load_state_dict({n: ck.get(n).clone() for n in ck.names})
        return net.eval()

    net = build(models / "base")
    qmerge.load(net, pack)
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"DeltaLinear", "DeltaEmbedding", "DeltaParams"} <= kinds
    ids = torch.tensor([[1, 5, 7], [3, 3, 9], [0, 39, 2]])
    with torch.no_grad():
        y = net(ids, task=["t2", "t0", "t1"])
        for i, t in enumerate(["t2", "t0", "t1"]):
            ref = build(models / f"ft{int(t[1])}")(ids[i : i + 1])[0]
            torch.testing.assert_close(y[i], ref, rtol=1e-5, atol=1e-5)
