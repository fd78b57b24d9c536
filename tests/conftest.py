"""Shared fixtures: fixed seeds, and one run per CPU instruction set for native kernels; slow
end-to-end tests (@pytest.mark.slow) run only with --slow (the suite runs small versions)."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _isa_params():
    if not ops.native_available():
        return [pytest.param("reference", id="reference")]
    return [pytest.param(isa, id=isa) for isa in ops.supported_isas()]


@pytest.fixture(params=_isa_params())
def isa(request):
    """Runs the test once per instruction set the native kernels support here (each forced),
    or once on the reference when the extension is absent."""
    if request.param == "reference":
        yield "reference"
        return
    before = ops.active_isa()
    ops.set_isa(request.param)
    try:
        yield request.param
    finally:
        ops.set_isa(before)


@pytest.fixture
def models(tmp_path):
    """tmp_path with a tiny Llama-shaped base ("base") and three fine-tunes ("ft0".."ft2")."""
    from tests.models import base_tensors, finetune_of, save

    b = base_tensors()
    save(b, tmp_path / "base")
    for i in range(3):
        save(finetune_of(b, i), tmp_path / f"ft{i}")
    return tmp_path
