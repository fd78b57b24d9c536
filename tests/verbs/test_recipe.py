"""mergekit recipes: `qmerge merge --config` reads them (or refuses naming the key), merges
fine-tunes straight into a model directory with the recipe's weights, into a pack with
--as-pack, and `--to-mergekit` writes a merge back as a recipe that reads the same."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import qmerge
from qmerge.cli import main
from qmerge.errors import ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.merge import METHODS, TensorCtx, make_config
from qmerge.merge.base import layer_index
from qmerge.verbs import recipe
from qmerge.verbs.merge_direct import merge_to_model
from tests.nn import tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    base, fts = tiny.llama(root)
    return root, base, fts


def _write(path, obj):
    path.write_text(yaml.safe_dump(obj))
    return path


def _ties(base, fts, **extra):
    models = [{"model": str(base)}] + [
        {"model": str(p), "parameters": {"weight": w, "density": d}}
        for p, w, d in zip(fts.values(), (1.0, 0.5, 2.0), (0.5, 0.7, 0.3), strict=True)
    ]
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": models,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
        "tokenizer_source": "base",
    } | extra


def _expected(base, fts, method, cfg):
    """W0 + the method's shared delta per tensor, computed here from the state dicts."""
    b = Checkpoint(base)
    f = [Checkpoint(p) for p in fts.values()]
    out = {}
    for n in b.names:
        w0 = b.get(n).float()
        d = torch.stack([c.get(n).float() - w0 for c in f])
        ctx = TensorCtx(n, layer_index(n), 3, tuple(fts), 0, w0)
        out[n] = w0 + METHODS[method].fn(d, make_config(method, cfg), ctx).shared
    return out


def test_a_ties_recipe_merges_straight_to_a_model_directory(lm, tmp_path):
    root, base, fts = lm
    r = recipe.read(_write(tmp_path / "r.yml", _ties(base, fts)))
    assert r.mergekit_method == "ties" and r.choice.method.name == "gta"
    cfg = r.choice.config
    assert (cfg.sparsify, cfg.consensus, cfg.normalize) == ("magnitude", "sum", True)
    assert cfg.weights == "1.0/0.5/2.0" and cfg.densities == "0.5/0.7/0.3"
    report = merge_to_model(r.base, r.models, r.choice, tmp_path / "out", dtype=r.out_dtype)
    assert report["shards"] == ["model.safetensors"]
    got = Checkpoint(tmp_path / "out")
    want = _expected(
        base,
        fts,
        "gta",
        {
            k: getattr(cfg, k)
            for k in ("sparsify", "consensus", "weights", "densities", "normalize")
        },
    )
    for n, w in want.items():
        assert torch.equal(got.get(n), w), n
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.dtype == torch.float32
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(
    "method, params, extra",
    [
        ("task_arithmetic", {"weight": 0.4}, {"lambda": 0.5}),
        ("breadcrumbs_ties", {"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}),
        ("model_stock", {}, {"filter_wise": False}),
        ("linear", {"weight": 1.0}, {}),
    ],
)
def test_each_recipe_method_gives_its_formula(lm, tmp_path, method, params, extra):
    root, base, fts = lm
    models = [{"model": str(p), **({"parameters": params} if params else {})} for p in fts.values()]
    if method == "linear":  # the base among the averaged models, weight 2
        models.append({"model": str(base), "parameters": {"weight": 2.0}})
    obj = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}
    r = recipe.read(_write(tmp_path / "r.yml", obj | ({"parameters": extra} if extra else {})))
    merge_to_model(r.base, r.models, r.choice, tmp_path / "out")
    got = Checkpoint(tmp_path / "out")
    cfg = r.choice.config
    n = "model.layers.1.self_attn.o_proj.weight"
    w0 = Checkpoint(base).get(n)
    d = torch.stack([Checkpoint(p).get(n) - w0 for p in fts.values()])
    if method == "task_arithmetic":
        want = w0 + 0.5 * 0.4 * d.sum(0)
    elif method == "linear":
        want = w0 + d.sum(0) / 5
    else:
        fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
        want = _expected(base, fts, r.choice.method.name, fields)[n]
    torch.testing.assert_close(got.get(n), want, rtol=0, atol=1e-7)


def test_slerp_recipe_interpolates_the_other_model_from_the_base(lm, tmp_path):
    root, base, fts = lm
    obj = {
        "merge_method": "slerp",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(fts["t1"])}],
        "parameters": {"t": 0.3},
    }
    r = recipe.read(_write(tmp_path / "r.yml", obj))
    merge_to_model(r.base, r.models, r.choice, tmp_path / "out")
    from qmerge.merge.slerp import slerp

    n = "model.layers.0.mlp.up_proj.weight"
    want = slerp(0.3, Checkpoint(base).get(n), Checkpoint(fts["t1"]).get(n))
    torch.testing.assert_close(Checkpoint(tmp_path / "out").get(n), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"slices": []}, "slices"),
        ({"merge_method": "nuslerp"}, "merge_method"),
        ({"tokenizer_source": "union"}, "tokenizer_source"),
        ({"parameters": {"normalize": True, "t": [0, 0.5, 1]}}, "parameters.t"),
        ({"parameters": {"weird": 1}}, "parameters.weird"),
        ({"models": [{"model": "/no/such/model"}]}, "models\\[0\\].model"),
        ({"models": [{"model": "/base+/lora"}]}, "models\\[0\\].model"),
        ({"base_model": None}, "base_model"),
        ({"dtype": "int4"}, "dtype"),
    ],
)
def test_what_qmerge_cannot_do_is_refused_naming_the_key(lm, tmp_path, change, key):
    root, base, fts = lm
    path = _write(tmp_path / "r.yml", _ties(base, fts) | change)
    with pytest.raises(ConfigError, match=rf"r.yml: {key}"):
        recipe.read(path)


def test_cli_config_and_to_mergekit_round_trip(lm, tmp_path, capsys):
    root, base, fts = lm
    path = _write(tmp_path / "r.yml", _ties(base, fts))
    argv = ["merge", "--config", path, "--out", tmp_path / "m", "--json"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mergekit_method"] == "ties" and report["tensors"] > 0
    # a pack merge written back as a recipe reads as the same merge
    pack = tiny.compress(base, fts, tmp_path / "exact", tiny.EXACT)
    argv = ["merge", pack, "--method", "breadcrumbs_ties", "--option", "density=0.8"]
    argv += ["--option", "weights=1/2/3", "--base", base, "--to-mergekit", tmp_path / "b.yml"]
    assert main([str(a) for a in argv + ["--json"]]) == 0
    capsys.readouterr()
    back = recipe.read(tmp_path / "b.yml")
    assert back.mergekit_method == "breadcrumbs_ties"
    cfg = back.choice.config
    assert (cfg.sparsify, cfg.consensus, cfg.weights) == ("outliers", "sum", "1.0/2.0/3.0")
    assert list(back.models.values()) == [fts[t] for t in sorted(fts)]
    # --as-pack: the same recipe as a merged pack
    argv = ["merge", "--config", path, "--out", tmp_path / "p", "--as-pack", "--json"]
    assert main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["pack"]["merge"]["method"] == "gta"


def test_the_direct_merge_shards_and_casts_like_a_transformers_checkpoint(lm, tmp_path):
    root, base, fts = lm
    r = recipe.read(_write(tmp_path / "r.yml", _ties(base, fts, out_dtype="bfloat16")))
    assert r.out_dtype == torch.bfloat16
    merge_to_model(r.base, r.models, r.choice, tmp_path / "one", dtype=r.out_dtype)
    many = merge_to_model(
        r.base, r.models, r.choice, tmp_path / "many", dtype=r.out_dtype, max_shard_bytes=8192
    )
    assert len(many["shards"]) > 1 and (tmp_path / "many" / "model.safetensors.index.json").exists()
    a, b = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "many")
    assert a.names == b.names and all(torch.equal(a.get(n), b.get(n)) for n in a.names)
    assert {a.dtype(n) for n in a.names} == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    assert model.config.dtype == torch.bfloat16
    with pytest.raises(qmerge.errors.PackError, match="not empty"):
        merge_to_model(r.base, r.models, r.choice, tmp_path / "one")


def test_a_recipe_over_a_pack_names_its_tasks(lm, tmp_path, capsys):
    root, base, fts = lm
    pack = tiny.compress(base, fts, tmp_path / "exact", tiny.EXACT)
    obj = {
        "merge_method": "ties",
        "models": [  # by name and by source path, in another order than the pack's
            {"model": "t2", "parameters": {"weight": 2.0, "density": 0.3}},
            {"model": str(fts["t0"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "t1", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
    }
    path = _write(tmp_path / "r.yml", obj)
    argv = ["merge", pack, "--config", path, "--out", tmp_path / "m", "--json"]
    assert main([str(a) for a in argv]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = out["merge"]["config"]
    assert cfg["weights"] == "1.0/0.5/2.0" and cfg["densities"] == "0.5/0.7/0.3"  # pack order
    obj["models"] = obj["models"][:2]
    with pytest.raises(ConfigError, match="leaves out task 't1'"):
        recipe.read(_write(tmp_path / "r2.yml", obj), {t: fts[t] for t in sorted(fts)})
