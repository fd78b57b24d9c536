"""`--executor ray`: compress, add-task and merge as units on a local Ray (2 CPUs) write the
same bytes as the one-process path, for every codec and merge method; a worker killed mid-unit
is retried and changes nothing; a failing or killed coordinator leaves the old pack."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qmerge
from qmerge.codecs.base import sq_sum
from qmerge.codecs.encode import encode, threads_matter
from qmerge.codecs.policy import resolve
from qmerge.errors import CheckpointError
from qmerge.merge import METHODS
from qmerge.verbs import compress_units, merge_units
from qmerge.verbs.executor import FAILPOINT, Inline, Ray
from qmerge.verbs.tensors import plan
from tests.models import SHAPES, base_tensors, finetune_of, save, tree_bytes

ray = pytest.importorskip("ray")

CODECS = [
    qmerge.Policy(),  # 1-bit signs, per-row scales; dense vectors
    qmerge.Policy(codec="sign:granularity=tensor"),
    qmerge.Policy(codec="sign:granularity=group,group_size=8,scale_dtype=fp32"),
    qmerge.Policy(codec="lowrank:rank=3"),
    qmerge.Policy(codec="lowrank:energy=0.6,factor_dtype=int8"),
    qmerge.Policy(codec="lowrank:budget_bits=3"),
    qmerge.Policy(codec="dense:dtype=fp32", vectors="dense:dtype=fp32"),
    qmerge.Policy(codec="auto:sqnr_db=9"),
    qmerge.Policy(
        types={
            "attention": "lowrank:rank=2",
            "mlp": "sign:granularity=tensor",
            "embedding": "dense",
        },
        patterns={"*down_proj*": "lowrank:budget_bits=2"},
        tasks={"ft1": {"types": {"mlp": "dense:dtype=fp16"}}},
        skip_below=1e-4,
    ),
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def small_units(monkeypatch):
    """Units of one or two tensors, so even the tiny model is several units."""
    monkeypatch.setattr(compress_units, "UNIT_BYTES", 2048)
    monkeypatch.setattr(merge_units, "UNIT_BYTES", 4096)


def _compress(models: Path, out: str, policy, executor, **kw) -> Path:
    tasks = {f"ft{i}": models / f"ft{i}" for i in range(3)}
    opts = qmerge.Options(policy=policy, progress=False, **kw)
    qmerge.compress(models / "base", tasks, models / out, opts=opts, executor=executor)
    return models / out


@pytest.mark.parametrize("policy", CODECS, ids=lambda p: str(p.codec))
def test_ray_writes_the_bytes_of_one_process_for_every_codec(models, small_units, policy):
    one = tree_bytes(_compress(models, "local", policy, None))
    run = Ray()
    assert tree_bytes(_compress(models, "ray", policy, run)) == one
    assert run.report.units >= 4 and run.report.retries == 0 and run.report.workers == 2


@pytest.mark.parametrize(
    "policy",
    [
        qmerge.Policy(),
        qmerge.Policy(codec="sign:granularity=group,group_size=8"),
        qmerge.Policy(codec="dense:dtype=fp32", skip_below=0.02),
    ],
    ids=["sign", "sign-group", "dense-skip"],
)
def test_large_tensors_cut_into_row_slices_give_the_same_bytes(models, small_units, policy):
    """The embedding and the MLP matrices are larger than a unit: under a row-wise codec they
    are encoded as slices of rows on different workers. The fine-tunes leave the first 32
    embedding rows alone (a slice of zeros in a tensor that is not) and, with skip_below, the
    whole up_proj below the threshold: skipping is decided for the tensor, not the slice."""
    b = base_tensors()
    for i in range(3):
        ft = finetune_of(b, i)
        ft["model.embed_tokens.weight"][:32] = b["model.embed_tokens.weight"][:32]
        up = "model.layers.0.mlp.up_proj.weight"
        ft[up] = b[up] + 0.01 * (ft[up] - b[up])
        save(ft, models / f"ft{i}")
    base = qmerge.format.checkpoint.Checkpoint(models / "base")
    fts = {f"ft{i}": qmerge.format.checkpoint.Checkpoint(models / f"ft{i}") for i in range(3)}
    opts = qmerge.Options(policy=policy, progress=False)
    extra = {t: plan(base, ft, opts) for t, ft in fts.items()}
    groups = compress_units.partition(
        base, base.names, splittable=compress_units._splittable(base, extra, opts)
    )
    sliced = [g[0] for g, rows in groups if rows is not None]
    assert sliced.count("model.embed_tokens.weight") >= 2, groups
    one = tree_bytes(_compress(models, "local", policy, None))
    assert tree_bytes(_compress(models, "ray", policy, "ray")) == one
    assert tree_bytes(_compress(models, "inline", policy, Inline())) == one


def test_calibrated_signs_resized_vocab_heads_and_exclude(models, small_units):
    g = torch.Generator().manual_seed(3)
    calib = {n: torch.randn(12, s[-1], generator=g) for n, s in SHAPES.items() if len(s) == 2}
    b = base_tensors()
    for i in range(3):  # a grown vocabulary and a task head
        ft = finetune_of(b, i)
        ft["model.embed_tokens.weight"] = torch.cat([ft["model.embed_tokens.weight"]] * 2)[:44]
        ft["score.weight"] = torch.randn(2, 16, generator=g)
        save(ft, models / f"ft{i}")
    kw = dict(
        calib=calib,
        allow_resized_vocab=True,
        heads=("score.*",),
        exclude=("model.norm.weight",),
    )
    policy = qmerge.Policy(codec="sign:calibrate=true")
    one = tree_bytes(_compress(models, "local", policy, None, **kw))
    assert tree_bytes(_compress(models, "ray", policy, "ray", **kw)) == one
    assert tree_bytes(_compress(models, "inline", policy, Inline(), **kw)) == one


def test_add_task_on_ray_matches_one_process(models, small_units):
    for out in ("local", "ray"):
        _compress(models, out, qmerge.Policy(), None)
    qmerge.add_task(models / "local", models / "base", {"more": models / "ft0"})
    qmerge.add_task(models / "ray", models / "base", {"more": models / "ft0"}, executor="ray")
    assert tree_bytes(models / "ray") == tree_bytes(models / "local")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ray_merges_to_the_bytes_of_one_process(models, small_units, method):
    src = _compress(models, "src", qmerge.Policy(), None)
    kw = {}
    if METHODS[method].needs_base:  # SLERP: the base's weights, and two endpoints
        qmerge.remove_task(src, ["ft2"])
        kw = {"base": models / "base"}
    qmerge.merge_pack(src, models / "m-local", method, **kw)
    qmerge.merge_pack(src, models / "m-ray", method, executor="ray", **kw)
    one = tree_bytes(models / "m-local")
    assert tree_bytes(models / "m-ray") == one
    assert len(one) >= 2  # a shared delta or exclusive parts were written


def test_a_worker_killed_mid_unit_is_retried_and_changes_nothing(
    models, small_units, monkeypatch, tmp_path
):
    one = tree_bytes(_compress(models, "local", qmerge.Policy(), None))
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(FAILPOINT, f"1:{marker}")  # unit 1's worker dies after one fragment
    run = Ray()
    assert tree_bytes(_compress(models, "ray", qmerge.Policy(), run)) == one
    assert marker.exists() and run.report.retries >= 1
    src = models / "local"
    marker.unlink()
    merge_run = Ray()
    qmerge.merge_pack(src, models / "m-ray", "ties", executor=merge_run)
    qmerge.merge_pack(src, models / "m-local", "ties")
    assert marker.exists() and merge_run.report.retries >= 1
    assert tree_bytes(models / "m-ray") == tree_bytes(models / "m-local")


def test_a_failing_unit_raises_its_own_error_and_leaves_the_old_pack(models, small_units):
    pack = _compress(models, "ray", qmerge.Policy(), "ray")
    before = tree_bytes(pack)
    bad = finetune_of(base_tensors(), 1)
    bad["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save(bad, models / "ft1")
    tasks = {f"ft{i}": models / f"ft{i}" for i in range(3)}
    with pytest.raises(CheckpointError, match="not finite"):
        qmerge.compress(
            models / "base",
            tasks,
            pack,
            opts=qmerge.Options(progress=False),
            overwrite=True,
            executor="ray",
        )
    assert tree_bytes(pack) == before
    with pytest.raises(CheckpointError, match="not finite"):
        qmerge.add_task(pack, models / "base", {"bad": models / "ft1"}, executor="ray")
    assert tree_bytes(pack) == before
    assert not [p for p in pack.iterdir() if p.name.startswith(".fragments")]


def _killed(models: Path, call: str) -> subprocess.CompletedProcess:
    """`call` (qmerge.compress or add_task on Ray) in a child whose coordinator dies after
    the workers wrote their fragments, before the commit."""
    script = f"""
import os, qmerge
from qmerge.verbs import compress_units
compress_units.UNIT_BYTES = 2048
def die(*a, **k):
    os._exit(9)
compress_units.open_fragment = die
tasks = {{f"ft{{i}}": {str(models)!r} + f"/ft{{i}}" for i in range(3)}}
base = {str(models / "base")!r}
{call}
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=240)


def test_a_killed_coordinator_leaves_the_old_pack(models, small_units):
    pack = _compress(models, "ray", qmerge.Policy(), None)
    before = tree_bytes(pack)
    opts = "opts=qmerge.Options(progress=False), executor='ray'"
    r = _killed(models, f"qmerge.compress(base, tasks, {str(pack)!r}, overwrite=True, {opts})")
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    assert tree_bytes(pack) == before
    r = _killed(models, f"qmerge.add_task({str(pack)!r}, base, {{'more': tasks['ft0']}}, {opts})")
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    report = qmerge.verify(pack)  # the pack is whole; the dead writer's scratch is reported
    assert report["tasks"] == ["ft0", "ft1", "ft2"] and not report["stray_files"]
    left = {Path(p) for p in report["leftover_dirs"]}  # the killed compress's staged copy too
    inside = [p for p in left if p.parent == pack]
    assert len(inside) == 1 and inside[0].name.startswith(".fragments-"), left
    assert all(p.name.startswith(".ray.") for p in left - set(inside)), left
    assert {k: v for k, v in tree_bytes(pack).items() if not k.startswith(".fragments")} == before


@pytest.mark.parametrize(
    "spec",
    [
        "sign",
        "sign:granularity=tensor",
        "sign:granularity=group,group_size=64",
        "sign:calibrate=true",
        "dense",
        "dense:dtype=fp32",
    ],
)
def test_codecs_that_say_threads_do_not_matter_give_the_same_bytes(spec):
    """Ray units of these codecs run on one thread while one process runs on all: their
    bytes must not depend on it (Residual.threads_matter)."""
    choice = resolve(spec)
    assert not threads_matter(choice)
    g = torch.Generator().manual_seed(0)
    shapes = [(96, 400), (400, 96), (1, 300000), (2048, 257)]
    digests = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            h = hashlib.sha256()
            for shape in shapes:
                d = torch.randn(shape, generator=g) * 0.01
                calib = torch.randn(16, shape[1], generator=g)
                r, _, _ = encode(d, choice, calib)
                for v in r.parts().values():
                    h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
            digests.append(h.hexdigest())
            g.manual_seed(0)
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]
    assert threads_matter(resolve("lowrank")) and threads_matter(resolve("auto"))


def test_the_figures_in_the_manifest_do_not_depend_on_threads():
    """sq_sum (the SQNR of every entry) once summed in an order set by the thread count: the
    manifests of a local and a Ray compress differed in the last digits of SQNR."""
    g = torch.Generator().manual_seed(1)
    t, minus = torch.randn(3000, 700, generator=g), torch.randn(3000, 700, generator=g)
    before = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums.append((sq_sum(t), sq_sum(t, minus)))
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1]
    assert abs(sums[0][0] - float((t.double() ** 2).sum())) < 1e-9 * sums[0][0]


def test_the_cli_reports_the_units_and_refuses_ray_flags_without_ray(models, capsys):
    from qmerge.cli import main

    argv = ["compress", "--base", str(models / "base"), "--out", str(models / "cli")]
    argv += [a for i in range(3) for a in ("--task", f"ft{i}={models / f'ft{i}'}")]
    assert main([*argv, "--executor", "ray", "--json", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert report["executor"]["executor"] == "ray" and report["executor"]["units"] >= 1
    assert report["executor"]["workers"] == 2
    assert main([*argv, "--overwrite", "--workers", "2"]) == 1
    assert "--executor ray" in capsys.readouterr().err


def test_calibration_texts_and_distillation_on_ray_match_one_process(tmp_path, small_units):
    """Layer inputs from texts are computed by the coordinator and shipped to each unit with
    its tensors; the scale distillation runs in the coordinator on what the units encoded."""
    pytest.importorskip("transformers")
    import random

    from tests.nn import tiny

    base, fts = tiny.bert(tmp_path, labels=(3,))
    tiny.save_tokenizer(base, 80, {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3})
    rng = random.Random(0)
    texts = [" ".join(rng.choice(tiny.WORDS) for _ in range(5)) for _ in range(8)]
    opts = qmerge.Options(
        policy=qmerge.Policy(codec="sign:calibrate=true,scale_dtype=fp32"),
        calib_texts={"*": texts},
        distill_steps=3,
        heads=("classifier.*",),
        progress=False,
    )
    qmerge.compress(base, fts, tmp_path / "local", opts=opts)
    qmerge.compress(base, fts, tmp_path / "ray", opts=opts, executor="ray")
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "local")
