"""compress / add_task / remove_task / verify end to end on tiny Llama-shaped checkpoints."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qmerge
from qmerge.codecs import SignConfig, SignResidual, sqnr_db
from qmerge.errors import BaseMismatchError, CheckpointError, ChecksumError, PackError
from qmerge.format.pack import Pack
from tests.models import base_tensors, finetune_of, save, tree_bytes

QUIET = qmerge.Options(progress=False)


def test_pack_holds_each_tensor_as_its_codec_encodes_it(models):
    pack = qmerge.compress(
        models / "base", {"a": models / "ft0", "b": models / "ft1"}, models / "pack", opts=QUIET
    )
    assert pack.tasks == ["a", "b"]
    b = base_tensors()
    ft = finetune_of(b, 1)
    table = pack.entries("b")
    for name in b:
        delta = ft[name] - b[name]
        res = qmerge.residual(pack, "b", name)
        e = table[name]
        if name == "model.norm.weight":  # frozen: an exactly-zero delta costs nothing
            assert e["codec"] == "skip" and e["bytes"] == 0
            continue
        if delta.dim() == 1:
            assert e["codec"] == "dense"
            torch.testing.assert_close(res.dequantize(), delta, rtol=2**-8, atol=0)
            continue
        assert e["codec"] == "sign" and e["config"]["granularity"] == "row"
        want = SignResidual.from_dense(delta, SignConfig())
        assert torch.equal(res.signs, want.signs) and torch.equal(res.scales, want.scales)
        got = sqnr_db(float(delta.double().pow(2).sum()), want.error_energy(delta))
        assert e["sqnr_db"] == pytest.approx(got)
        assert e["bits_per_param"] == pytest.approx(1 + 16 / delta.shape[1])
    report = qmerge.verify(models / "pack", base=models / "base")
    assert report["base"] == "matches" and report["files_checked"] == 2


def test_add_and_remove_leave_other_tasks_untouched(models):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    before = (models / "pack/tasks/a.safetensors").read_bytes()
    qmerge.add_task(
        models / "pack", models / "base", {"b": models / "ft1", "c": models / "ft2"}, opts=QUIET
    )
    qmerge.remove_task(models / "pack", ["b"])
    assert (models / "pack/tasks/a.safetensors").read_bytes() == before
    assert Pack.open(models / "pack").tasks == ["a", "c"]
    assert sorted(p.name for p in (models / "pack/tasks").iterdir()) == [
        "a.safetensors",
        "c.safetensors",
    ]
    qmerge.verify(models / "pack", base=models / "base")


def _refused(root, exc, match, fn):
    """fn must raise exc matching `match` and leave every file under root as it was."""
    before = tree_bytes(root)
    with pytest.raises(exc, match=match):
        fn()
    assert tree_bytes(root) == before


def test_refuses_a_different_base(models, tmp_path):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    other = base_tensors(seed=7)
    save(other, tmp_path / "other")
    msg = "base tensor '.*' has different values .* different base"
    _refused(
        models,
        BaseMismatchError,
        msg,
        lambda: qmerge.add_task(
            models / "pack", tmp_path / "other", {"b": models / "ft1"}, opts=QUIET
        ),
    )
    _refused(
        models,
        BaseMismatchError,
        msg,
        lambda: qmerge.verify(models / "pack", base=tmp_path / "other"),
    )
    _refused(
        models,
        BaseMismatchError,
        msg,
        lambda: qmerge.open_pack(models / "pack", base=tmp_path / "other"),
    )
    smaller = dict(other)
    del smaller["model.norm.weight"]
    save(smaller, tmp_path / "smaller")
    _refused(
        models,
        BaseMismatchError,
        "no tensor 'model.norm.weight'",
        lambda: qmerge.verify(models / "pack", base=tmp_path / "smaller"),
    )


def test_refuses_mismatched_tensor_names_and_shapes(models):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    ft = finetune_of(base_tensors(), 5)
    del ft["model.layers.0.mlp.up_proj.weight"]
    save(ft, models / "missing")
    _refused(
        models,
        CheckpointError,
        "no tensor 'model.layers.0.mlp.up_proj.weight'",
        lambda: qmerge.add_task(
            models / "pack", models / "base", {"x": models / "missing"}, opts=QUIET
        ),
    )
    ft = finetune_of(base_tensors(), 5)
    ft["classifier.weight"] = torch.zeros(2, 16)
    save(ft, models / "extra")
    _refused(
        models,
        CheckpointError,
        "tensor 'classifier.weight' that the base does not",
        lambda: qmerge.compress(
            models / "base", {"x": models / "extra"}, models / "pack", opts=QUIET, overwrite=True
        ),
    )
    ft = finetune_of(base_tensors(), 5)
    ft["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, 17)
    save(ft, models / "shape")
    _refused(
        models,
        CheckpointError,
        r"'model.layers.0.mlp.up_proj.weight' has shape \[48, 17\]",
        lambda: qmerge.compress(
            models / "base", {"x": models / "shape"}, models / "pack", opts=QUIET, overwrite=True
        ),
    )


def test_a_resized_vocabulary_needs_the_explicit_option(models):
    b = base_tensors()
    ft = finetune_of(b, 3)
    new_rows = torch.randn(4, 16)
    ft["model.embed_tokens.weight"] = torch.cat([ft["model.embed_tokens.weight"], new_rows])
    save(ft, models / "grown")
    _refused(
        models,
        CheckpointError,
        "resized vocabulary.*--allow-resized-vocab",
        lambda: qmerge.compress(
            models / "base", {"x": models / "grown"}, models / "pack", opts=QUIET
        ),
    )
    opts = qmerge.Options(progress=False, allow_resized_vocab=True)
    pack = qmerge.compress(models / "base", {"x": models / "grown"}, models / "pack", opts=opts)
    e = pack.entries("x")["model.embed_tokens.weight"]
    assert e["extra_rows"] == 4 and e["shape"] == [40, 16]
    assert torch.equal(pack.parts("x", "model.embed_tokens.weight")["extra_rows"], new_rows)
    qmerge.verify(models / "pack", base=models / "base")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_refuses_non_finite_deltas(models, bad):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    ft = finetune_of(base_tensors(), 5)
    ft["model.layers.0.mlp.down_proj.weight"][3, 7] = bad
    save(ft, models / "nan")
    msg = r"'model.layers.0.mlp.down_proj.weight': the delta is not finite at index \[3, 7\]"
    _refused(
        models,
        CheckpointError,
        msg,
        lambda: qmerge.add_task(
            models / "pack", models / "base", {"b": models / "ft1", "x": models / "nan"}, opts=QUIET
        ),
    )
    _refused(
        models,
        CheckpointError,
        msg,
        lambda: qmerge.compress(
            models / "base", {"x": models / "nan"}, models / "pack", opts=QUIET, overwrite=True
        ),
    )
    assert not [p for p in models.iterdir() if p.name.startswith(".pack")]  # no staging left


def test_refuses_damaged_files(models):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    f = models / "pack/tasks/a.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:-10])
    _refused(
        models, ChecksumError, "a.safetensors: is truncated", lambda: qmerge.verify(models / "pack")
    )
    f.write_bytes(raw[:100] + bytes([raw[100] ^ 4]) + raw[101:])
    _refused(
        models,
        ChecksumError,
        "a.safetensors: is corrupted: sha256",
        lambda: qmerge.verify(models / "pack"),
    )
    pack = Pack.open(models / "pack")
    _refused(
        models, ChecksumError, "corrupted", lambda: qmerge.residual(pack, "a", "model.norm.weight")
    )


def test_refuses_to_overwrite_without_asking_and_duplicate_tasks(models):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    _refused(
        models,
        PackError,
        "already exists; pass --overwrite",
        lambda: qmerge.compress(
            models / "base", {"a": models / "ft1"}, models / "pack", opts=QUIET
        ),
    )
    _refused(
        models,
        PackError,
        "already has task 'a'",
        lambda: qmerge.add_task(
            models / "pack", models / "base", {"a": models / "ft1"}, opts=QUIET
        ),
    )
    _refused(models, PackError, "no task 'zz'", lambda: qmerge.remove_task(models / "pack", ["zz"]))
    _refused(
        models,
        PackError,
        "not valid",
        lambda: qmerge.add_task(
            models / "pack", models / "base", {"../evil": models / "ft1"}, opts=QUIET
        ),
    )


def test_interrupted_writes_leave_the_old_pack(models, monkeypatch):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    from qmerge.verbs import compress as compressor

    real, calls = compressor.encode_task, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compressor, "encode_task", flaky)
    _refused(
        models,
        KeyboardInterrupt,
        None,
        lambda: qmerge.compress(
            models / "base",
            {"b": models / "ft1", "c": models / "ft2"},
            models / "pack",
            opts=QUIET,
            overwrite=True,
        ),
    )
    calls.clear()
    _refused(
        models,
        KeyboardInterrupt,
        None,
        lambda: qmerge.add_task(
            models / "pack", models / "base", {"b": models / "ft1", "c": models / "ft2"}, opts=QUIET
        ),
    )
    qmerge.verify(models / "pack", base=models / "base")


def test_a_killed_process_leaves_the_old_pack(models):
    qmerge.compress(models / "base", {"a": models / "ft0"}, models / "pack", opts=QUIET)
    before = tree_bytes(models / "pack")
    script = textwrap.dedent(f"""
        import os, signal, qmerge
        from qmerge.format import writer
        real = writer.write_task_file
        def die(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # after the first task file, mid-run
        writer.write_task_file = die
        qmerge.compress({str(models / "base")!r}, {{"b": {str(models / "ft1")!r},
                        "c": {str(models / "ft2")!r}}}, {str(models / "pack")!r},
                        opts=qmerge.Options(progress=False), overwrite=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert tree_bytes(models / "pack") == before
    qmerge.verify(models / "pack", base=models / "base")


def test_lowrank_budget_and_auto_through_the_policy(models):
    policy = qmerge.Policy(
        codec="lowrank:budget_bits=4,factor_dtype=fp32", types={"embedding": "auto:sqnr_db=9"}
    )
    pack = qmerge.compress(
        models / "base",
        {"a": models / "ft0"},
        models / "pack",
        opts=qmerge.Options(policy=policy, progress=False),
    )
    table = pack.entries("a")
    low = [e for e in table.values() if e["config"].get("budget_bits") == 4]
    params = sum(
        e["params"]
        for n, e in table.items()
        if len(e["shape"]) == 2 and e["module_type"] != "embedding"
    )
    assert low and sum(e["bytes"] for e in low) <= 4 / 8 * params
    emb = table["model.embed_tokens.weight"]
    assert emb["sqnr_db"] is None or emb["sqnr_db"] >= 9
    assert emb["info"]["auto_sqnr_db"] == 9
    qmerge.verify(models / "pack")


def test_golden_bytes_of_a_tiny_pack(tmp_path, monkeypatch):
    """Pins the pack format: a change here is a format change and must bump format_version."""
    monkeypatch.chdir(tmp_path)
    idx = torch.arange(96, dtype=torch.float32)
    base = {
        "layer.attn.q_proj.weight": torch.sin(idx).reshape(8, 12),
        "layer.norm.weight": torch.ones(12),
    }
    ft = {
        "layer.attn.q_proj.weight": base["layer.attn.q_proj.weight"]
        + 0.01 * torch.cos(3 * idx).reshape(8, 12),
        "layer.norm.weight": torch.ones(12) + 0.001 * torch.arange(12.0),
    }
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft")
    qmerge.compress("base", {"t": "ft"}, "pack", opts=QUIET)
    task = (tmp_path / "pack/tasks/t.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "pack/manifest.json").read_text())
    manifest.pop("generator")
    # row 0 of the delta is 0.01*cos(3i), i = 0..11: signs alternate + - + - ..., and packed
    # least significant bit first that is 0b01010101, then 0b0101 (padding bits 0)
    delta = ft["layer.attn.q_proj.weight"] - base["layer.attn.q_proj.weight"]
    sign = SignResidual.from_dense(delta, SignConfig())
    assert sign.signs[0].tolist() == [0b01010101, 0b0101]
    digest = hashlib.sha256(task).hexdigest()
    mdigest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    assert (digest, mdigest) == GOLDEN, (digest, mdigest)


GOLDEN = (
    "3c29285c5494d770c5300ece573ac94525de123f336b14bdfb12ca8d5ea24d9d",
    "776bf98825ca2600c151c8ef61e890067f109de5945feba6572d92cfc370c709",
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_streaming_memory_does_not_grow_with_tasks(tmp_path):
    """Peak anonymous memory while compressing is one task's output plus a few tensors, the
    same for one and for three fine-tunes (12 tensors of 4 MiB per model). The dense codec
    makes a task's output 24 MiB, so holding any fine-tune's output (or model) past its own
    task would show as >= 24 MiB more for three."""
    g = torch.Generator().manual_seed(0)
    base = {
        f"layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024, generator=g) for i in range(12)
    }
    save(base, tmp_path / "base")
    save(
        {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / "ft"
    )
    script = textwrap.dedent("""
        import json, sys, threading, time
        import qmerge
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        base, ft, out, n = sys.argv[1:5]
        opts = qmerge.Options(policy=qmerge.Policy(codec="dense"), progress=False)
        start = anon(); peak = [start]; done = []
        def sample():
            while not done:
                peak[0] = max(peak[0], anon()); time.sleep(0.0005)
        t = threading.Thread(target=sample); t.start()
        qmerge.compress(base, {f"t{i}": ft for i in range(int(n))}, out, opts=opts)
        done.append(1); t.join()
        print(json.dumps({"start": start, "peak": peak[0]}))
    """)
    runs = {}
    for n in (1, 3):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(tmp_path / "base"),
                str(tmp_path / "ft"),
                str(tmp_path / f"pack{n}"),
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs[n] = json.loads(out)
    tensor = 4 << 20
    growth = {n: r["peak"] - r["start"] for n, r in runs.items()}
    # measured 48-62 MiB: the task's 24 MiB, a delta, its dequantized copy, allocator slack
    assert growth[1] < 20 * tensor, growth
    # runs differ by up to ~13 MiB (allocator); two retained task outputs would add 48 MiB
    assert runs[3]["peak"] - runs[1]["peak"] < 6 * tensor, runs
