"""The pack writer: fragments written by other processes and adopted by a coordinator, refused
when they are not what they claim, and transactions that leave the pack as it was when they
fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import qmerge
from qmerge.errors import ChecksumError, PackError
from qmerge.format.pack import Pack, part_key
from qmerge.format.writer import Fragment, PackWriter, write_task_file
from tests.models import base_tensors, finetune_of, save, tree_bytes

QUIET = qmerge.Options(progress=False)


@pytest.fixture
def pack(tmp_path):
    base = base_tensors()
    save(base, tmp_path / "base")
    save(finetune_of(base, 0), tmp_path / "ft0")
    qmerge.compress(tmp_path / "base", {"a": tmp_path / "ft0"}, tmp_path / "pack", opts=QUIET)
    return tmp_path / "pack"


def _entry(pack_dir, task: str) -> dict:
    return dict(Pack.open(pack_dir).manifest["tasks"][task])


def test_a_fragment_from_another_process_is_adopted(pack, tmp_path):
    entry = {k: v for k, v in _entry(pack, "a").items() if k != "file"}
    src = Pack.open(pack).task_file("a")
    out = tmp_path / "new"
    with PackWriter.create(out, Pack.open(pack).base_fingerprint) as w:
        # a worker process writes the file into the transaction's staging directory and hands
        # back only the fragment's description (plain data)
        script = textwrap.dedent(f"""
            import json
            from pathlib import Path
            from qmerge.format.pack import Pack
            from qmerge.format.writer import write_task_file
            src = Pack.open({str(pack)!r}).task_file("a")
            frag = write_task_file(Path({str(w.staging)!r}), "b",
                                   {{k: src.get(k) for k in src.keys()}})
            print(json.dumps([frag.rel, frag.bytes, frag.sha256]))
        """)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        w.adopt_task(Fragment(*json.loads(done.stdout)), "b", entry)
        assert not (w.staging / "manifest.json").exists()  # the manifest is written last
    assert qmerge.verify(out)["tasks"] == ["b"]
    got = Pack.open(out).task_file("b")
    assert sorted(got.keys()) == sorted(src.keys())
    for k in src.keys():
        assert torch.equal(got.get(k), src.get(k))


def test_a_fragment_that_differs_from_its_description_is_refused(pack):
    before = tree_bytes(pack)
    with pytest.raises(ChecksumError, match="differs from the fragment"):
        with PackWriter.edit(pack) as w:
            key = part_key("model.norm.weight", "delta")
            frag = write_task_file(w.staging, "c", {key: torch.ones(16)})
            with open(w.staging / frag.rel, "r+b") as f:
                f.seek(-1, 2)
                f.write(b"\x01")
            w.adopt_task(frag, "c", {"source": "", "tensors": {}})
    assert tree_bytes(pack) == before  # the stray file is gone, the manifest unchanged
    with pytest.raises(PackError, match="not the file of task"):
        with PackWriter.edit(pack) as w:
            w.adopt_task(Fragment("tasks/x.safetensors", 1, "0" * 64), "c", {})


def test_a_failed_edit_leaves_the_pack_as_it_was(pack):
    before = tree_bytes(pack)
    with pytest.raises(RuntimeError, match="boom"):
        with PackWriter.edit(pack) as w:
            w.put_task(
                "c",
                {part_key("model.norm.weight", "delta"): torch.ones(16)},
                {"source": "", "tensors": {}},
            )
            w.remove_task("a")
            raise RuntimeError("boom")
    assert tree_bytes(pack) == before
    qmerge.verify(pack)


def test_a_task_name_is_taken_once(pack):
    before = tree_bytes(pack)
    with pytest.raises(PackError, match="already has task 'a'"):
        with PackWriter.edit(pack) as w:
            w.put_task("a", {}, {"source": "", "tensors": {}})
    assert tree_bytes(pack) == before  # task a's file was never rewritten
    qmerge.verify(pack)
