"""Hostile packs, generated (issue 30): random byte flips and truncations of a pack's files,
and manifests whose JSON is replaced piece by piece with arbitrary JSON (deep, huge, wrong
types). `verify`, `inspect` and `run` must answer each with exit 0 or the one-line error
(exit 1): never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmerge.cli import main
from tests.models import base_tensors, finetune_of, save

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
SETTINGS = settings(
    max_examples=int(os.environ.get("QMERGE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    b = base_tensors()
    save(b, root / "base")
    save(finetune_of(b, 0), root / "ft0")
    save(finetune_of(b, 1), root / "ft1")
    argv = ["compress", "--base", str(root / "base"), "--out", str(root / "pack"), "--quiet"]
    assert main([*argv, "--task", f"a={root / 'ft0'}", "--task", f"b={root / 'ft1'}"]) == 0
    return root / "pack"


def _answers_cleanly(path: Path, base: Path) -> None:
    """Every verb that reads a pack: exit 0, or exit 1 with one line on stderr; 10 s at most."""

    def hang(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, hang)
    try:
        for argv in (
            ["verify", str(path), "--base", str(base)],
            ["inspect", str(path)],
            ["verify", str(path), "--json"],
        ):
            err = io.StringIO()
            signal.alarm(10)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            signal.alarm(0)
            assert rc in (0, 1), argv
            if rc:
                lines = err.getvalue().strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith(f"qmerge {argv[0]}: error:"), lines
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _copy(pack: Path, tmp: str) -> Path:
    out = Path(tmp) / "pack"
    shutil.copytree(pack, out)
    return out


@SETTINGS
@given(data=st.data())
def test_byte_flips_and_truncations(pack, data):
    files = sorted(p.relative_to(pack) for p in pack.rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        p = _copy(pack, tmp)
        f = p / data.draw(st.sampled_from(files))
        raw = bytearray(f.read_bytes())
        if data.draw(st.booleans()) and raw:
            for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                raw[i] ^= data.draw(st.integers(1, 255))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        f.write_bytes(bytes(raw))
        _answers_cleanly(p, pack.parent / "base")


@SETTINGS
@given(data=st.data())
def test_manifest_pieces_replaced_by_arbitrary_json(pack, data):
    manifest = json.loads((pack / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        p = _copy(pack, tmp)
        node, keys = manifest, []
        while isinstance(node, dict) and node and data.draw(st.booleans()):
            k = data.draw(st.sampled_from(sorted(node)))
            keys.append(k)
            node = node[k]
        new = json.loads(json.dumps(manifest))
        target = new
        for k in keys[:-1]:
            target = target[k]
        if keys:
            target[keys[-1]] = data.draw(JSON)
        else:
            new = data.draw(JSON)
        (p / "manifest.json").write_text(json.dumps(new))
        _answers_cleanly(p, pack.parent / "base")


def test_a_deeply_nested_manifest(pack, tmp_path):
    p = _copy(pack, str(tmp_path))
    (p / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    _answers_cleanly(p, pack.parent / "base")
