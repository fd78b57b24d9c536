import json
import os

import pytest
import torch

from qmerge.errors import CheckpointError
from qmerge.format.checkpoint import Checkpoint
from tests.models import base_tensors, save


def _same(ckpt, tensors):
    assert ckpt.names == sorted(tensors)
    for n, t in tensors.items():
        assert torch.equal(ckpt.get(n), t), n
        assert ckpt.shape(n) == tuple(t.shape) and ckpt.dtype(n) == t.dtype


def test_single_file_and_directory(tmp_path):
    t = base_tensors()
    d = save(t, tmp_path / "m")
    _same(Checkpoint(d), t)
    _same(Checkpoint(d / "model.safetensors"), t)


def test_sharded_directory_with_index(tmp_path):
    t = base_tensors()
    names = sorted(t)
    d = tmp_path / "m"
    save({n: t[n] for n in names[:3]}, d / "a")
    save({n: t[n] for n in names[3:]}, d / "b")
    (d / "a" / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "b" / "model.safetensors").rename(d / "model-00002-of-00002.safetensors")
    index = {
        "weight_map": {
            n: ("model-00001-of-00002.safetensors" if i < 3 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)
        }
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _same(Checkpoint(d), t)
    index["weight_map"][names[0]] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(d)


def test_pytorch_bin_through_weights_only(tmp_path):
    t = base_tensors()
    d = tmp_path / "m"
    d.mkdir()
    torch.save(t, d / "pytorch_model.bin")
    _same(Checkpoint(d), t)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "m"
    d.mkdir()
    torch.save({"w": torch.zeros(2), "x": _Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(d)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint(tmp_path / "empty")
