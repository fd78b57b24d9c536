"""`qmerge merge` on real (tiny) transformers packs: the merged pack loads, routes and exports
to exactly the weights its method defines, computed here from the fine-tunes directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qmerge
from qmerge.errors import ConfigError, PackError
from qmerge.merge import METHODS, make_config
from qmerge.merge.base import TensorCtx, layer_index
from qmerge.verbs.packs import shared_residual
from tests.nn import tiny

transformers = pytest.importorskip("transformers")
FP32 = "dense:dtype=fp32"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base, fts = tiny.llama(root)
    pack = tiny.compress(base, fts, root / "dense", tiny.EXACT)
    return root, base, fts, pack


IDS = torch.tensor([[5, 9, 3, 17, 22, 8], [40, 4, 4, 12, 30, 1], [7, 7, 19, 2, 61, 33]])


def _model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _expected(base, fts, method: str, opts: dict, task: str | None):
    """The model the method defines for `task` (None: the shared delta alone), built from the
    fine-tunes' state dicts with the method's function over each whole tensor."""
    b = _model(base)
    state = b.state_dict()
    tasks = sorted(fts)
    ft_states = {t: _model(fts[t]).state_dict() for t in tasks}
    cfg = make_config(method, opts)
    pk = qmerge.open_pack(fts and next(iter(fts.values())).parent / "dense")
    names = set(pk.entries(tasks[0]))
    layers = max(i for n in pk.base_fingerprint["tensors"] if (i := layer_index(n)) is not None)
    with torch.no_grad():
        for name in state:
            key = name if name in names else None
            if key is None:
                continue
            d = torch.stack([ft_states[t][name] - state[name] for t in tasks])
            out = METHODS[method].fn(
                d, cfg, TensorCtx(name, layer_index(name), layers + 1, tuple(tasks))
            )
            w = state[name] + out.shared
            if task is not None and out.exclusive is not None:
                ex = out.exclusive[tasks.index(task)]
                w = w + (ex if isinstance(ex, torch.Tensor) else ex.dequantize())
            state[name] = w
    b.load_state_dict(state)
    return b


@pytest.mark.parametrize(
    "method,opts,task",
    [
        ("task_arithmetic", {"scale": 0.4}, None),
        ("ties", {"density": 0.3}, None),
        ("dare", {"drop": 0.5, "seed": 3}, None),
        ("lines", {"beta": 0.8}, None),
        ("emr", {}, "t1"),
        ("twin", {"shared": "ties"}, "t2"),
        ("gta", {"sparsify": "magnitude", "consensus": "sum", "weights": "1/2/0.5"}, None),
        ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}, None),
        ("della", {"density": 0.6, "epsilon": 0.2, "seed": 2}, None),
        ("model_stock", {"filter_wise": True}, None),
    ],
)
def test_merged_pack_routes_to_the_methods_weights(lm, method, opts, task):
    root, base, fts, pack = lm
    out = root / f"m-{method}"
    qmerge.merge_pack(
        pack,
        out,
        method,
        make_config(method, opts),
        shared_codec=FP32,
        exclusive=tiny.EXACT,
        overwrite=True,
    )
    assert qmerge.verify(out, base=base)["base"] == "matches"
    man = json.loads((out / "manifest.json").read_text())
    assert man["merge"]["method"] == method
    assert all(man["merge"]["config"][k] == v for k, v in opts.items())  # the recipe, seeds too
    routed = qmerge.load(base, out)
    want = _expected(base, fts, method, opts, task).eval()
    with torch.no_grad():
        got = routed(input_ids=IDS, task=task or "base").logits
        ref = want(input_ids=IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the backbone goes back bit for bit
    qmerge.unload(routed)
    plain = _model(base)
    for (n, p), (_, q) in zip(routed.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_twin_with_lossless_codecs_reproduces_every_fine_tune(lm):
    root, base, fts, pack = lm
    out = qmerge.merge_pack(
        pack, root / "twin-exact", "twin", shared_codec=FP32, exclusive=tiny.EXACT, overwrite=True
    ).path
    routed = qmerge.load(base, out)
    with torch.no_grad():
        for t, path in fts.items():
            torch.testing.assert_close(
                routed(input_ids=IDS, task=t).logits,
                _model(path)(input_ids=IDS).logits,
                rtol=1e-4,
                atol=1e-4,
            )
        # a mixed batch: one task per row
        mixed = routed(input_ids=IDS, task=["t0", "t1", "t2"]).logits
        for i, t in enumerate(["t0", "t1", "t2"]):
            torch.testing.assert_close(
                mixed[i], _model(fts[t])(input_ids=IDS[i : i + 1]).logits[0], rtol=1e-4, atol=1e-4
            )


def test_twin_one_bit_exclusive_is_smaller_than_the_tasks_and_closer_than_the_static(lm):
    root, base, fts, pack = lm
    twin = qmerge.merge_pack(pack, root / "twin-sign", "twin", overwrite=True).path
    info = qmerge.inspect(twin)
    assert info["merge"]["shared"]["codecs"] == {
        "dense": len(qmerge.open_pack(twin).shared_entries())
    }
    routed = qmerge.load(base, twin)
    with torch.no_grad():
        ft = _model(fts["t0"])(input_ids=IDS).logits
        err_twin = (routed(input_ids=IDS, task="t0").logits - ft).abs().mean()
        err_static = (routed(input_ids=IDS, task="base").logits - ft).abs().mean()
    assert err_twin < err_static
    for t in info["tasks"].values():
        assert t["bits_per_param"] < 2.5  # 1-bit matrices, dense vectors


def test_task_arithmetic_over_one_bit_tasks_sums_the_packed_bits(lm):
    """Over 1-bit residuals TA runs on the packed bits (dequant_add_sign): the same shared
    delta as the dense sum of the dequantized residuals."""
    root, base, fts, _ = lm
    signs = tiny.compress(base, fts, root / "signs", "sign")
    out = qmerge.merge_pack(
        signs, root / "ta-bits", "task_arithmetic:scale=0.5", shared_codec=FP32, overwrite=True
    )
    src = qmerge.open_pack(signs)
    for name in out.shared_entries():
        want = (
            sum(
                qmerge.residual(src, t, name).dequantize()
                for t in src.tasks
                if name in src.entries(t)
            )
            * 0.5
        )
        got = shared_residual(out, name).dequantize()
        torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-6, atol=1e-7)


def test_export_shared_is_the_static_merge(lm, tmp_path):
    root, base, fts, pack = lm
    out = qmerge.merge_pack(
        pack, root / "ta-export", "task_arithmetic", shared_codec=FP32, overwrite=True
    ).path
    qmerge.export(out, base, tmp_path / "hf", shared=True)
    want = _expected(base, fts, "task_arithmetic", {}, None)
    got = _model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(
            got(input_ids=IDS).logits, want(input_ids=IDS).logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("spec", ["task_arithmetic:scale=0.7", "ties:density=0.3", "lines"])
def test_shared_deltas_in_memory_equal_the_merged_packs(lm, spec):
    root, base, fts, pack = lm
    name = spec.split(":")[0]
    out = qmerge.merge_pack(
        pack, root / f"mem-{name}", spec, shared_codec=FP32, exclusive=tiny.EXACT, overwrite=True
    )
    got = dict(qmerge.shared_deltas(pack, spec))
    stored = out.shared_entries()
    assert stored and set(stored) <= set(got)
    for n, d in got.items():
        if n not in stored:  # the pack skips an all-zero delta (tiny.perturbed leaves norms)
            assert not d.any(), n
            continue
        torch.testing.assert_close(
            d.reshape(-1), shared_residual(out, n).dequantize().reshape(-1), rtol=0, atol=0
        )


def test_classifier_heads_survive_the_merge(tmp_path):
    base, fts = tiny.bert(tmp_path)
    pack = tiny.compress(base, fts, tmp_path / "pack", tiny.EXACT, heads=("classifier.*",))
    out = qmerge.merge_pack(
        pack, tmp_path / "twin", "twin", shared_codec=FP32, exclusive=tiny.EXACT
    )
    for t in out.tasks:
        assert out.labels(t) == qmerge.open_pack(pack).labels(t)
        for k, v in out.heads(t).items():
            assert torch.equal(v, qmerge.open_pack(pack).heads(t)[k])
    routed = qmerge.load(base, out)
    ids = torch.tensor([[2, 14, 33, 50, 7, 3]])
    with torch.no_grad():
        for t, path in fts.items():
            ft = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
            want = ft(input_ids=ids).logits  # the routed head pads to the widest task's labels
            got = routed(input_ids=ids, task=t).logits[:, : want.shape[1]]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_merges_are_refused_and_write_nothing(lm, tmp_path):
    root, base, fts, pack = lm
    with pytest.raises(ConfigError, match="unknown merge method"):
        qmerge.merge_pack(pack, tmp_path / "x", "soup")
    with pytest.raises(PackError, match="is the source pack"):
        qmerge.merge_pack(pack, pack, "ties")
    merged = qmerge.merge_pack(pack, tmp_path / "m", "ties").path
    with pytest.raises(PackError, match="already a merged pack"):
        qmerge.merge_pack(merged, tmp_path / "m2", "ties")
    with pytest.raises(PackError, match="already exists"):
        qmerge.merge_pack(pack, merged, "ties")
    assert not (tmp_path / "x").exists() and not (tmp_path / "m2").exists()
    # a damaged shared file is caught
    f = merged / "shared.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(PackError, match="shared.safetensors"):
        qmerge.verify(merged)


def test_cli_merge(lm, tmp_path):
    root, base, fts, pack = lm
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmerge",
            "merge",
            str(pack),
            "--method",
            "dare",
            "--option",
            "drop=0.5",
            "--option",
            "seed=7",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["merge"]["method"] == "dare" and info["merge"]["config"]["seed"] == 7
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmerge",
            "merge",
            str(pack),
            "--method",
            "ties",
            "--option",
            "density=2",
            "--out",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "density" in r.stderr and not (tmp_path / "bad").exists()


def test_slerp_needs_the_packs_base_and_interpolates_two_tasks(lm, tmp_path):
    root, base, fts, _ = lm
    two = {t: fts[t] for t in ("t0", "t1")}
    pack = tiny.compress(base, two, tmp_path / "two", tiny.EXACT)
    with pytest.raises(ConfigError, match="give --base"):
        qmerge.merge_pack(pack, tmp_path / "s", "slerp:t=0.3")
    other = tiny.perturbed(_model(base), 9)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(qmerge.errors.BaseMismatchError):
        qmerge.merge_pack(pack, tmp_path / "s", "slerp:t=0.3", base=tmp_path / "other")
    out = qmerge.merge_pack(pack, tmp_path / "s", "slerp:t=0.3", shared_codec=FP32, base=base)
    from qmerge.merge.slerp import slerp

    b, a0, a1 = (_model(p).state_dict() for p in (base, fts["t0"], fts["t1"]))
    name = "model.layers.1.mlp.down_proj.weight"
    got = shared_residual(out, name).dequantize(torch.float32)
    torch.testing.assert_close(b[name] + got, slerp(0.3, a0[name], a1[name]), rtol=0, atol=1e-6)
