import struct

import pytest
import torch

from qmerge.errors import QmergeError
from qmerge.format.safetensors_io import SafetensorsFile, sha256_file, write_safetensors

ALL = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(7).half(),
    "bf16": torch.randn(2, 3).bfloat16(),
    "u8": torch.arange(11, dtype=torch.uint8),
    "i64": torch.arange(-3, 3),
    "empty": torch.empty(0, 4),
    "scalar": torch.tensor(2.5),
    "bool": torch.tensor([True, False]),
}


def _write(path, tensors, meta=None):
    with open(path, "wb") as f:
        return write_safetensors(f, tensors, meta)


def test_round_trip_every_dtype(tmp_path):
    n, sha = _write(tmp_path / "a.safetensors", ALL, {"k": "v"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.keys()) == sorted(ALL)
    assert f.metadata == {"k": "v"}
    assert n == (tmp_path / "a.safetensors").stat().st_size
    assert sha == sha256_file(tmp_path / "a.safetensors")
    for k, t in ALL.items():
        assert f.get(k).dtype == t.dtype and torch.equal(f.get(k), t), k


def test_same_tensors_same_bytes(tmp_path):
    _, a = _write(tmp_path / "a.safetensors", ALL)
    _, b = _write(tmp_path / "b.safetensors", dict(reversed(ALL.items())))
    assert a == b


def test_tensors_are_mapped_not_copied(tmp_path):
    _write(tmp_path / "a.safetensors", {"w": torch.randn(256, 256)})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    t = f.get("w")
    t2 = f.get("w")
    assert t.data_ptr() == t2.data_ptr()  # both views of the one mapping


def test_interoperates_with_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {k: v for k, v in ALL.items() if k != "scalar"}
    _write(tmp_path / "ours.safetensors", tensors)
    theirs = st.load_file(tmp_path / "ours.safetensors")
    for k, t in tensors.items():
        assert torch.equal(theirs[k], t), k
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    for k, t in tensors.items():
        assert torch.equal(f.get(k), t), k


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1])
def test_truncated_files_raise_the_given_error(tmp_path, cut):
    p = tmp_path / "a.safetensors"
    _write(p, {"w": torch.randn(4, 4)})
    raw = p.read_bytes()
    p.write_bytes(raw[:cut] if cut >= 0 else raw[:-1])

    class Mine(QmergeError):
        pass

    with pytest.raises(Mine, match="a.safetensors"):
        SafetensorsFile(p, error=Mine)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b"[1, 2]",
        b'{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"a": 1}}',
    ],
)
def test_malformed_headers_are_refused(tmp_path, header):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(QmergeError, match="bad.safetensors"):
        SafetensorsFile(p)
