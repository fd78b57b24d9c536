"""The pack verbs of the CLI: --json output, and every refusal as one line, exit 1, no change."""

import json
import subprocess
import sys

import pytest
import torch

from qmerge.cli import main
from tests.models import base_tensors, finetune_of, save, tree_bytes


def _ok(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def test_compress_inspect_verify_add_remove(models, capsys):
    m = models
    out = _ok(
        capsys,
        "compress",
        "--base",
        m / "base",
        "--task",
        f"a={m / 'ft0'}",
        "--task",
        f"b={m / 'ft1'}",
        "--out",
        m / "pack",
        "--json",
    )
    report = json.loads(out.out)
    assert sorted(report["tasks"]) == ["a", "b"]
    assert report["tasks"]["a"]["by_module_type"]["mlp"]["bits_per_param"] == pytest.approx(
        1 + 16 / 32, rel=0.2
    )  # 16-wide rows and 48-wide: 1 bit + a bf16 scale per row
    _ok(
        capsys,
        "add-task",
        m / "pack",
        "--base",
        m / "base",
        "--task",
        f"c={m / 'ft2'}",
        "--codec",
        "lowrank:rank=2",
        "--quiet",
    )
    info = json.loads(_ok(capsys, "inspect", m / "pack", "--json").out)
    assert info["tasks"]["c"]["codecs"]["lowrank"] == 4
    text = _ok(capsys, "verify", m / "pack", "--base", m / "base").out
    assert text.startswith("ok:") and "base matches" in text
    _ok(capsys, "remove-task", m / "pack", "a")
    assert json.loads(_ok(capsys, "verify", m / "pack", "--json").out)["tasks"] == ["b", "c"]


def _refused(capsys, root, match, *argv):
    before = tree_bytes(root)
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"qmerge {argv[0]}: error: ") and match in err, err
    assert tree_bytes(root) == before


def test_every_refusal_is_one_line_and_changes_nothing(models, capsys):
    m = models
    _ok(
        capsys,
        "compress",
        "--base",
        m / "base",
        "--task",
        f"a={m / 'ft0'}",
        "--out",
        m / "pack",
        "--quiet",
    )
    save(base_tensors(seed=9), m / "other")
    _refused(
        capsys,
        m,
        "different base",
        "add-task",
        m / "pack",
        "--base",
        m / "other",
        "--task",
        f"b={m / 'ft1'}",
    )
    _refused(capsys, m, "different base", "verify", m / "pack", "--base", m / "other")

    bad = finetune_of(base_tensors(), 4)
    bad["extra.weight"] = torch.zeros(2, 2)
    save(bad, m / "extra")
    _refused(
        capsys,
        m,
        "tensor 'extra.weight' that the base does not",
        "compress",
        "--base",
        m / "base",
        "--task",
        f"x={m / 'extra'}",
        "--out",
        m / "pack",
        "--overwrite",
    )

    bad = finetune_of(base_tensors(), 4)
    bad["model.embed_tokens.weight"] = torch.zeros(41, 16)
    save(bad, m / "vocab")
    _refused(
        capsys,
        m,
        "--allow-resized-vocab",
        "add-task",
        m / "pack",
        "--base",
        m / "base",
        "--task",
        f"x={m / 'vocab'}",
    )

    bad = finetune_of(base_tensors(), 4)
    bad["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save(bad, m / "nan")
    _refused(
        capsys,
        m,
        "not finite",
        "add-task",
        m / "pack",
        "--base",
        m / "base",
        "--task",
        f"x={m / 'nan'}",
    )

    _refused(
        capsys,
        m,
        "unknown codec",
        "add-task",
        m / "pack",
        "--base",
        m / "base",
        "--task",
        f"x={m / 'ft1'}",
        "--codec",
        "signs",
    )

    manifest = json.loads((m / "pack/manifest.json").read_text())
    manifest["format_version"] = 99
    (m / "pack/manifest.json").write_text(json.dumps(manifest))
    _refused(capsys, m, "format_version 99 is newer", "verify", m / "pack")
    _refused(capsys, m, "format_version 99 is newer", "inspect", m / "pack")
    manifest["format_version"] = 1
    (m / "pack/manifest.json").write_text(json.dumps(manifest))

    f = m / "pack/tasks/a.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x80
    f.write_bytes(bytes(raw))
    _refused(capsys, m, "a.safetensors: is corrupted", "verify", m / "pack")


@pytest.mark.parametrize("name", ["base", "auto", "Auto", "a+b"])
def test_route_words_are_refused_as_new_task_names(models, capsys, name):
    """A task named like a route word ('base', 'auto', a mixture 'a+b') could never be asked
    for by name (issue 30, 10)."""
    m = models
    _refused(
        capsys,
        m,
        "reserved by the route grammar",
        "compress",
        "--base",
        m / "base",
        "--task",
        f"{name}={m / 'ft0'}",
        "--out",
        m / "x",
    )


def test_os_errors_are_one_line(models, capsys, tmp_path):
    """An OS error (here --out under a regular file) is the one-line error, not a traceback
    (issue 30, 6)."""
    m = models
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _refused(
        capsys,
        tmp_path,
        str(blocker),
        "compress",
        "--base",
        m / "base",
        "--task",
        f"a={m / 'ft0'}",
        "--out",
        blocker / "pack",
    )


def test_deeply_nested_json_is_one_line(models, capsys, tmp_path):
    """A policy nested deeper than Python's stack (issue 30, 8)."""
    m = models
    policy = tmp_path / "policy.json"
    policy.write_text("[" * 100_000 + "]" * 100_000)
    _refused(
        capsys,
        tmp_path,
        "nested too deeply",
        "compress",
        "--base",
        m / "base",
        "--task",
        f"a={m / 'ft0'}",
        "--out",
        tmp_path / "p",
        "--policy",
        policy,
    )


def test_a_real_process_prints_no_traceback(models):
    proc = subprocess.run(
        [sys.executable, "-m", "qmerge", "verify", str(models / "nothing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    want = f"qmerge verify: error: {models / 'nothing'}: not a pack (no manifest.json)"
    # the last line: without the extension, a RuntimeWarning about it comes first
    assert proc.stderr.strip().splitlines()[-1] == want and "Traceback" not in proc.stderr


def test_help_on_every_verb(capsys):
    for verb in ("compress", "add-task", "remove-task", "verify", "inspect", "demo", "info"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "usage: qmerge " + verb in capsys.readouterr().out
