"""Backend reporting, instruction-set control, and import without the extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qmerge import ops


def test_backend_reports_cpu_kernels():
    b = ops.backend()
    assert set(b) >= {"cpu", "cuda"}
    if ops.native_available():
        assert b["cpu"] == f"native-{ops.active_isa()}"
    else:
        assert b["cpu"] == "reference" and "reason" in b


@pytest.mark.skipif(not ops.native_available(), reason="needs the compiled extension")
def test_set_isa_validates():
    with pytest.raises(ValueError, match="unknown instruction set"):
        ops.set_isa("sse9")
    before = ops.active_isa()
    for isa in ops.supported_isas():
        ops.set_isa(isa)
        assert ops.active_isa() == isa
    ops.set_isa("auto")
    assert ops.active_isa() == ops.supported_isas()[0]
    ops.set_isa(before)


@pytest.mark.skipif(not ops.native_available(), reason="needs the compiled extension")
def test_qmerge_isa_environment_variable():
    code = "from qmerge import ops; print(ops.active_isa())"
    env = {**os.environ, "QMERGE_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"


def test_import_without_extension_warns_once_and_works():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, qmerge\n"
        "    from qmerge import ops\n"
        "msgs = [str(x.message) for x in w if 'qmerge' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert ops.backend()['cpu'] == 'reference'\n"
        "p = ops.pack_signs(torch.tensor([[1.0, -1.0, 2.0]]))\n"
        "print(int(p[0, 0]))\n"
    )
    env = {**os.environ, "QMERGE_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


def test_ops_run_on_meta_device_without_data():
    y = ops.sign_linear(
        torch.empty(2, 9, device="meta"),
        torch.empty(3, 9, device="meta"),
        torch.empty(1, 3, 2, dtype=torch.uint8, device="meta"),
        torch.empty(1, 3, 1, device="meta"),
        task_ids=torch.zeros(2, dtype=torch.long, device="meta"),
    )
    assert y.shape == (2, 3) and y.device.type == "meta"


def test_cuda_backend_variable_is_checked_and_reported():
    """A bad QMERGE_CUDA_BACKEND fails the import naming the choices; one that cannot be had
    here warns and falls back to the reference for CUDA tensors."""
    code = "from qmerge import ops; print(ops.backend()['cuda'])"
    bad = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "QMERGE_CUDA_BACKEND": "gpu9"},
    )
    assert bad.returncode != 0 and "QMERGE_CUDA_BACKEND must be one of auto, native" in bad.stderr
    if torch.cuda.is_available():
        return
    ok = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "QMERGE_CUDA_BACKEND": "reference"},
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "reference"
    assert ops.backend()["cuda"] == "reference" and "cuda_reason" in ops.backend()
