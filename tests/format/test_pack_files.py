"""A pack from a stranger, or one damaged on disk, only ever raises PackError (documented)."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmerge
from qmerge.errors import ChecksumError, FormatVersionError, PackError
from qmerge.format import manifest as mf
from qmerge.format.pack import Pack
from tests.models import base_tensors, finetune_of, save

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    b = base_tensors()
    save(b, root / "base")
    save(finetune_of(b, 1), root / "ft1")
    save(finetune_of(b, 2), root / "ft2")
    qmerge.compress(
        root / "base",
        {"a": root / "ft1", "b": root / "ft2"},
        root / "pack",
        opts=qmerge.Options(progress=False),
    )
    return root / "pack"


def _use(path):
    """Everything a reader does with a pack."""
    qmerge.verify(path)
    qmerge.inspect(path)
    pack = Pack.open(path)
    for task in pack.tasks:
        for name in pack.entries(task):
            qmerge.residual(pack, task, name).dequantize()


def test_the_fixture_pack_is_valid(pack_dir):
    _use(pack_dir)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_fuzzed_manifests_raise_only_pack_errors(pack_dir, tmp_path_factory, data):
    original = json.loads((pack_dir / mf.NAME).read_text())
    paths = list(_paths(original))
    target = data.draw(st.sampled_from(paths[1:]))
    mutated = copy.deepcopy(original)
    node = mutated
    for key in target[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[target[-1]]
    else:
        node[target[-1]] = data.draw(json_values)
    work = tmp_path_factory.mktemp("fuzz")
    for p in pack_dir.rglob("*"):
        if p.is_file():
            dst = work / p.relative_to(pack_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    (work / mf.NAME).write_text(json.dumps(mutated))
    try:
        _use(work)
    except PackError:
        pass


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_manifest_bytes_raise_only_pack_errors(pack_dir, tmp_path_factory, raw):
    work = tmp_path_factory.mktemp("raw")
    (work / mf.NAME).write_bytes(raw)
    with pytest.raises(PackError):
        _use(work)


def _copy(pack_dir, dst):
    for p in pack_dir.rglob("*"):
        if p.is_file():
            out = dst / p.relative_to(pack_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(p.read_bytes())
    return dst


@FUZZ
@given(data=st.data())
def test_bit_flips_in_task_files_are_checksum_errors(pack_dir, tmp_path_factory, data):
    work = _copy(pack_dir, tmp_path_factory.mktemp("flip"))
    f = work / "tasks" / data.draw(st.sampled_from(["a.safetensors", "b.safetensors"]))
    raw = bytearray(f.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    f.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="corrupted"):
        _use(work)


@FUZZ
@given(data=st.data())
def test_truncated_task_files_are_checksum_errors(pack_dir, tmp_path_factory, data):
    work = _copy(pack_dir, tmp_path_factory.mktemp("cut"))
    f = work / "tasks" / "a.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    with pytest.raises(ChecksumError, match="truncated"):
        _use(work)


def test_newer_format_version_is_refused(pack_dir, tmp_path):
    work = _copy(pack_dir, tmp_path / "p")
    m = json.loads((work / mf.NAME).read_text())
    m["format_version"] = mf.FORMAT_VERSION + 1
    (work / mf.NAME).write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="newer than this qmerge reads"):
        Pack.open(work)


def test_a_manifest_cannot_point_outside_the_pack(pack_dir, tmp_path):
    work = _copy(pack_dir, tmp_path / "p")
    m = json.loads((work / mf.NAME).read_text())
    m["files"]["../../etc/passwd"] = m["files"].pop("tasks/a.safetensors")
    m["tasks"]["a"]["file"] = "../../etc/passwd"
    (work / mf.NAME).write_text(json.dumps(m))
    with pytest.raises(PackError, match="not a file a pack holds"):
        Pack.open(work)
