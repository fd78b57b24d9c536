"""Regression tests for the reliability defects of issue 30 (item numbers in the tests' names):
each hostile input is the documented one-line error and changes nothing."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import qmerge
from qmerge.cli import _finite, main
from qmerge.errors import PackError
from qmerge.format import manifest as mf
from qmerge.format.safetensors_io import SafetensorsFile, write_safetensors
from qmerge.format.writer import locked
from tests.models import base_tensors, save


def _pack(models, capsys):
    argv = ["compress", "--base", str(models / "base"), "--task", f"a={models / 'ft0'}"]
    assert main([*argv, "--out", str(models / "pack"), "--quiet"]) == 0
    capsys.readouterr()
    return models / "pack"


def _one_line_error(capsys, argv, match):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


def test_10_verify_refuses_nan_scales_that_the_checksums_accept(models, capsys):
    pack = _pack(models, capsys)
    f = pack / "tasks" / "a.safetensors"
    src = SafetensorsFile(f)
    tensors = {k: src.get(k).clone() for k in src.keys()}
    key = next(k for k in tensors if k.endswith("scales"))
    tensors[key][0] = float("nan")
    del src
    with open(f, "wb") as out:
        nbytes, sha = write_safetensors(out, tensors, {"qmerge.task": "a"})
    manifest = json.loads((pack / mf.NAME).read_text())
    manifest["files"]["tasks/a.safetensors"].update(bytes=nbytes, sha256=sha)
    (pack / mf.NAME).write_text(json.dumps(manifest))
    _one_line_error(capsys, ["verify", pack], "holds NaN or inf")


def test_10_a_nan_head_is_refused(models, capsys):
    b = base_tensors()
    ft = {n: t + 0.01 for n, t in b.items()}
    ft["head.weight"] = torch.tensor([[1.0, float("nan")]])
    save(ft, models / "nanhead")
    argv = ["compress", "--base", models / "base", "--task", f"a={models / 'nanhead'}"]
    _one_line_error(capsys, [*argv, "--head", "head.*", "--out", models / "x"], "NaN or inf")
    assert not (models / "x").exists()


def test_10_an_oversized_manifest_is_refused_unread(models, capsys):
    pack = _pack(models, capsys)
    with open(pack / mf.NAME, "ab") as f:
        f.truncate(mf.MAX_MANIFEST_BYTES + 1)
    _one_line_error(capsys, ["inspect", pack], "over the")


def test_10_a_stray_file_name_that_is_not_utf8_is_printable(models, capsys):
    pack = _pack(models, capsys)
    name = os.fsencode(pack / "tasks") + b"/\xff\xfe.tmp"
    with open(name, "wb") as f:
        f.write(b"x")
    assert main(["verify", str(pack), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stray_files"] == ["tasks/\\xff\\xfe.tmp"]


def test_10_json_output_has_no_nan():
    got = _finite({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert got == {"a": None, "b": [1.0, None], "c": {"d": 2}}
    assert "NaN" not in json.dumps(got, allow_nan=False)


def test_5_a_task_file_linked_out_of_the_pack_is_refused(models, capsys, tmp_path):
    pack = _pack(models, capsys)
    f = pack / "tasks" / "a.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    f.rename(outside)
    f.symlink_to(outside)  # same bytes: only the link gives it away
    _one_line_error(capsys, ["verify", pack], "is a symbolic link")
    with pytest.raises(PackError, match="is a symbolic link"):
        qmerge.open_pack(pack).task_file("a")


def test_5_a_fifo_as_a_task_file_does_not_hang(models, capsys):
    pack = _pack(models, capsys)
    f = pack / "tasks" / "a.safetensors"
    f.unlink()
    os.mkfifo(f)
    _one_line_error(capsys, ["verify", pack], "is not a regular file")


def test_5_a_dangling_lock_link_makes_no_file_outside(models, capsys, tmp_path):
    pack = _pack(models, capsys)
    target = tmp_path / "created-outside"
    (pack / ".lock").unlink(missing_ok=True)
    (pack / ".lock").symlink_to(target)
    _one_line_error(capsys, ["remove-task", pack, "a"], "cannot open the pack's lock")
    assert not target.exists()


def test_2_a_writer_that_waited_on_a_swapped_pack_takes_the_live_lock(models, capsys):
    """compress --overwrite swaps a new directory in while it holds the old one's lock. A
    writer that waited on that lock must end up holding the new directory's lock, or it
    edits the new pack unlocked beside the next writer (issue 30, 2: packs naming deleted
    files, or tasks lost). Replayed step by step: hold the lock, let a writer wait on it, swap
    the directory, release; the writer must then hold the live lock."""
    import fcntl
    import shutil
    import threading

    pack = _pack(models, capsys)
    holds_live_lock: list[bool] = []
    waiting = threading.Event()

    def writer():
        waiting.set()
        with locked(pack):
            fd = os.open(pack / ".lock", os.O_RDWR)
            try:  # a second open file description: blocked iff the writer holds this lock
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holds_live_lock.append(False)
            except BlockingIOError:
                holds_live_lock.append(True)
            finally:
                os.close(fd)

    with locked(pack):
        t = threading.Thread(target=writer)
        t.start()
        waiting.wait()
        time.sleep(0.2)  # the writer is now blocked in flock on the old directory's lock
        new = models / ".pack.new"
        shutil.copytree(pack, new, ignore=shutil.ignore_patterns(".lock"))
        pack.rename(models / ".pack.old")
        new.rename(pack)  # what install_dir does at the end of create(overwrite=True)
    t.join(10)
    assert holds_live_lock == [True]


def test_8_a_shape_past_int64_and_a_deep_header_are_refused(tmp_path):
    from qmerge.errors import QmergeError

    def file_with(header: bytes):
        f = tmp_path / "t.safetensors"
        f.write_bytes(len(header).to_bytes(8, "little") + header)
        return f

    huge = json.dumps({"x": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}})
    with pytest.raises(QmergeError, match="is not a list of non-negative ints"):
        SafetensorsFile(file_with(huge.encode()))
    with pytest.raises(QmergeError, match="not valid JSON"):
        SafetensorsFile(file_with(b"[" * 100_000 + b"]" * 100_000))


def test_6_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    """ENOSPC while writing, and again when the file is closed (its buffer flushed): the
    atomic write fails with the OS error and leaves neither the target nor a hidden temporary
    file (before, the failing close skipped the clean-up)."""
    import errno

    from qmerge.format import atomic

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_open = open
    monkeypatch.setattr(atomic, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_10_verify_reports_what_a_killed_writer_left(models, capsys):
    import subprocess
    import sys

    pack = _pack(models, capsys)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    left = models / f".pack.tmp-{dead}-0123abcd"
    left.mkdir()
    busy = models / f".pack.tmp-{os.getpid()}-89abcdef"  # a writer still at work
    busy.mkdir()
    assert main(["verify", str(pack)]) == 0
    out = capsys.readouterr().out
    assert f"note: {left} was being built by a writer that was killed" in out
    assert str(busy) not in out


def test_6_compress_onto_a_full_tmpfs(models, capsys, tmp_path):
    """A real full disk where root may mount one: the one-line error, nothing left on it."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        argv = ["compress", "--base", models / "base", "--task", f"a={models / 'ft0'}"]
        _one_line_error(
            capsys,
            [*argv, "--out", mnt / "p", "--codec", "dense:dtype=fp32"],
            "No space left on device",
        )
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
