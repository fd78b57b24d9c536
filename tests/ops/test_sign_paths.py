"""sign_linear's execution paths, each forced with QMERGE_SIGN_PATH, against the fp32 reference:
the lookup-table path for mixed batches (csrc/cpu/sign_lut.h), fused and materialized."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops
from tests.ops.helpers import assert_within_eager, make_signs, route_coeffs, sign_eager

LOW = [torch.bfloat16, torch.float16]
# The paths are the native CPU op's: without the extension the op is the reference.
NATIVE = pytest.mark.skipif(not ops.native_available(), reason="needs the compiled extension")

SHAPES = [  # (rows N, out, in, tasks T): odd in_features, partial tiles of 32 outputs
    (1, 16, 24, 1),
    (7, 100, 37, 3),
    (16, 33, 129, 16),
    (32, 130, 257, 8),
    (64, 64, 515, 16),
]


def run(monkeypatch, path, x, base, packed, scales, **route):
    monkeypatch.setenv("QMERGE_SIGN_PATH", path)
    return ops.sign_linear(x, base, packed, scales, **route)


def reference(x, base, packed, scales, bias=None, **route):
    args = {k: (v.float() if k == "coeffs" else v) for k, v in route.items()}
    b = None if bias is None else bias.float()
    return ops.reference.sign_linear(x.float(), base.float(), packed, scales, bias=b, **args)


@pytest.mark.parametrize("path", ["lut", "fused", "materialized"])
@pytest.mark.parametrize("dtype", [*LOW, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_task_ids_on_each_path(monkeypatch, isa, path, dtype, shape):
    if path == "lut" and dtype == torch.float16:
        pytest.skip("fp16 rows are quantized to int8: within eager's error at bf16 only")
    rows, out, inn, tasks = shape
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, scale_rows=1 if tasks % 2 else None)
    x = torch.randn(rows, inn).to(dtype)
    ids = torch.randint(-1, tasks, (rows,))  # -1: rows of the bare base
    y = run(monkeypatch, path, x, base, packed, scales, task_ids=ids)
    c = route_coeffs({"task_ids": ids}, rows, tasks)
    eager = sign_eager(x, base, packed, scales, c)
    assert_within_eager(y, reference(x, base, packed, scales, task_ids=ids), eager, path)


@pytest.mark.parametrize("path", ["lut", "fused", "materialized"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mixtures_and_bias_on_each_path(monkeypatch, isa, path, shape):
    rows, out, inn, tasks = shape
    base = torch.randn(out, inn).bfloat16()
    packed, scales = make_signs(tasks, out, inn)
    x = torch.randn(rows, inn).bfloat16()
    coeffs = torch.rand(rows, tasks) * (torch.rand(rows, tasks) > 0.5)  # some rows: no task
    bias = torch.randn(out)
    y = run(monkeypatch, path, x, base, packed, scales, coeffs=coeffs, bias=bias)
    exact = reference(x, base, packed, scales, coeffs=coeffs, bias=bias)
    eager = sign_eager(x, base, packed, scales, coeffs, bias)
    assert_within_eager(y, exact, eager, path)


@NATIVE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lut_is_the_same_at_every_instruction_set(monkeypatch, dtype):
    """The lookups sum exact integers (bf16 rows) or the same fp32 values in the same order
    (fp32 rows): every ISA gives the same bits. 24 rows: the base product is torch's GEMM
    (up to 8 rows it is qmerge's GEMV, whose summation order differs by ISA)."""
    base = torch.randn(70, 203).to(dtype)
    packed, scales = make_signs(5, 70, 203)
    x = torch.randn(24, 203).to(dtype)
    coeffs = torch.rand(24, 5) * (torch.rand(24, 5) > 0.3)
    outs = []
    try:
        for name in ops.supported_isas():
            ops.set_isa(name)
            outs.append(run(monkeypatch, "lut", x, base, packed, scales, coeffs=coeffs))
    finally:
        ops.set_isa("auto")
    assert all(torch.equal(outs[0], y) for y in outs[1:])


@NATIVE
@pytest.mark.parametrize("dtype", LOW)
def test_lut_error_within_its_quantization_bound(monkeypatch, dtype):
    """Forced at bf16 or fp16, the sign term's error is at most c * scale * d/2 per column
    (d = max|x| / 127), plus the roundings of the base GEMM's output and of the sum."""
    out, inn, tasks = 48, 300, 4
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn)
    x = torch.randn(8, inn).to(dtype)
    ids = torch.arange(8) % tasks
    y = run(monkeypatch, "lut", x, base, packed, scales, task_ids=ids).float()
    exact = reference(x, base, packed, scales, task_ids=ids)
    d = x.float().abs().amax(dim=1, keepdim=True) / 127
    quant = scales[ids, :, 0] * d / 2 * inn
    eps = torch.finfo(dtype).eps  # two roundings of at most half an ulp each, + GEMM order
    assert ((y - exact).abs() <= quant + 2 * eps * exact.abs() + 1e-4).all()
    assert (y - exact).abs().max() > 0  # the quantization is there


def test_lut_sees_signs_written_in_place(monkeypatch):
    """The re-laid bits are cached per tensor; writing into the tensor invalidates them."""
    base = torch.randn(40, 64).bfloat16()
    packed, scales = make_signs(2, 40, 64)
    x = torch.randn(4, 64).bfloat16()
    ids = torch.tensor([0, 1, 0, 1])
    run(monkeypatch, "lut", x, base, packed, scales, task_ids=ids)
    packed[1] = ops.reference.pack_signs(torch.randn(40, 64))
    y = run(monkeypatch, "lut", x, base, packed, scales, task_ids=ids)
    exact = reference(x, base, packed, scales, task_ids=ids)
    eager = sign_eager(x, base, packed, scales, route_coeffs({"task_ids": ids}, 4, 2))
    assert_within_eager(y, exact, eager, "after an in-place write")


@pytest.mark.parametrize("path", ["auto", "lut"])
def test_fp32_rows_are_not_quantized(monkeypatch, path):
    """fp32 rows take fp32 tables (no int8 step): a mixed batch of the serve benchmark's kind
    (32 rows over 5 tasks), whichever path auto picks or forced to lut, stays within eager
    fp32's error (int8 rows would miss it by orders of magnitude: sign_lut.h)."""
    base = torch.randn(96, 576) * 0.05
    packed, scales = make_signs(5, 96, 576)
    x = torch.randn(32, 576)
    ids = torch.arange(32) % 5
    y = run(monkeypatch, path, x, base, packed, scales, task_ids=ids)
    exact = reference(x, base, packed, scales, task_ids=ids)
    eager = sign_eager(x, base, packed, scales, route_coeffs({"task_ids": ids}, 32, 5))
    assert_within_eager(y, exact, eager, f"{path} fp32")


@NATIVE
@pytest.mark.parametrize("onednn", ["1", "0"])
def test_fp32_base_product_with_and_without_onednn(monkeypatch, onednn):
    """Above 8 fp32 rows and from 4M weight entries the lookup path takes its base product from
    oneDNN's matmul where torch has it (QMERGE_ONEDNN=0: each thread's torch GEMM): with a bias
    and mixtures, both within eager fp32's error."""
    monkeypatch.setenv("QMERGE_ONEDNN", onednn)
    out, inn = 4100, 1025  # 4.2M entries; odd in_features, a partial tile of outputs
    base = torch.randn(out, inn) * 0.05
    packed, scales = make_signs(6, out, inn)
    x = torch.randn(24, inn)
    coeffs = torch.rand(24, 6) * (torch.rand(24, 6) > 0.5)
    bias = torch.randn(out)
    y = run(monkeypatch, "lut", x, base, packed, scales, coeffs=coeffs, bias=bias)
    exact = reference(x, base, packed, scales, coeffs=coeffs, bias=bias)
    eager = sign_eager(x, base, packed, scales, coeffs, bias)
    assert_within_eager(y, exact, eager, f"lut fp32, QMERGE_ONEDNN={onednn}")


@NATIVE
def test_bad_path_values_are_refused(monkeypatch):
    base = torch.randn(8, 16).bfloat16()
    packed, scales = make_signs(2, 8, 16)
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(ValueError, match="QMERGE_SIGN_PATH='quick'"):
        run(monkeypatch, "quick", x, base, packed, scales, task_ids=torch.tensor([0, 1]))
    _, grouped = make_signs(2, 8, 16, groups=2)
    with pytest.raises(ValueError, match="one scale per output row"):
        run(monkeypatch, "lut", x, base, packed, grouped, task_ids=torch.tensor([0, 1]))
