import pytest

from qmerge.format.atomic import atomic_file, install_dir


def test_atomic_file_replaces_on_success(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with atomic_file(p) as f:
        f.write(b"new")
    assert p.read_bytes() == b"new"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_atomic_file_keeps_the_old_file_on_error(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(p) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


def test_install_dir_swaps_a_directory(tmp_path):
    old, new = tmp_path / "pack", tmp_path / "staged"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    install_dir(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]
