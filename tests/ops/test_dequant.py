"""dequant_add_sign: native kernels equal the reference bit for bit (same fp32 order)."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops
from tests.conftest import DTYPES
from tests.ops.helpers import make_signs

# (out, in, scale_rows, groups): per row, per tensor, groups that divide in, uneven groups
# (group starts not on a byte boundary), and in_features not a multiple of 8.
LAYOUTS = [
    (8, 16, None, 1),
    (5, 13, 1, 1),
    (7, 64, None, 4),
    (6, 50, None, 3),
    (9, 77, 1, 5),
    (4, 1000, None, 7),
    (33, 129, None, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("tasks", [1, 2, 3, 4, 8])  # 1..4 are compiled per count
def test_matches_reference_exactly(isa, dtype, layout, tasks):
    out, inn, rows, groups = layout
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, rows, groups)
    alphas = torch.randn(tasks)
    w = ops.dequant_add_sign(base, packed, scales, alphas)
    ref = ops.reference.dequant_add_sign(base, packed, scales, alphas)
    assert w.dtype == dtype
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


# Outputs of 8 MiB or more are written with non-temporal stores (kStreamBytes in
# csrc/cpu/dequant_add_sign.cpp), on the rows and groups whose start is vector-aligned; the
# others take plain stores. Rows of 4100 bf16 (8200 bytes) are aligned only every 4th row.
@pytest.mark.parametrize(
    "dtype,out,inn,groups",
    [
        (torch.bfloat16, 1024, 4096, 2),
        (torch.bfloat16, 1025, 4100, 1),
        (torch.float32, 520, 4104, 1),
        (torch.float16, 1024, 4100, 3),
    ],
    ids=str,
)
def test_large_outputs_streamed_match_reference(isa, dtype, out, inn, groups):
    assert out * inn * dtype.itemsize >= 8 << 20
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(2, out, inn, None, groups)
    alphas = torch.randn(2)
    ref = ops.reference.dequant_add_sign(base, packed, scales, alphas)
    torch.testing.assert_close(
        ops.dequant_add_sign(base, packed, scales, alphas), ref, rtol=0, atol=0
    )
    ops.dequant_add_sign(base, packed, scales, alphas, out=base)  # in place
    torch.testing.assert_close(base, ref, rtol=0, atol=0)


def test_one_task_gives_the_fine_tuned_weight(isa):
    """base + scale * sign(tau) at alpha 1 is exactly the 1-bit fine-tune."""
    base = torch.randn(16, 40)
    tau = torch.randn(16, 40) * 0.01
    scales = tau.abs().mean(-1, keepdim=True)
    w = ops.dequant_add_sign(base, ops.pack_signs(tau)[None], scales[None], torch.ones(1))
    assert torch.equal(w, base + scales * torch.where(tau >= 0, 1.0, -1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_variant_and_in_place(isa, dtype):
    base = torch.randn(12, 45).to(dtype)
    packed, scales = make_signs(2, 12, 45)
    alphas = torch.tensor([0.5, -1.5])
    expected = ops.reference.dequant_add_sign(base, packed, scales, alphas)
    buf = torch.full_like(base, 7.0)
    assert ops.dequant_add_sign(base, packed, scales, alphas, out=buf) is buf
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    inplace = base.clone()
    torch.ops.qmerge.dequant_add_sign_out(inplace, packed, scales, alphas, inplace)
    torch.testing.assert_close(inplace, expected, rtol=0, atol=0)


def test_non_finite_values_propagate(isa):
    base = torch.tensor([[float("nan"), float("inf"), 1.0, -2.0]]).to(torch.bfloat16)
    packed, scales = make_signs(1, 1, 4)
    w = ops.dequant_add_sign(base, packed, scales, torch.ones(1))
    ref = ops.reference.dequant_add_sign(base, packed, scales, torch.ones(1))
    torch.testing.assert_close(w, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_matches_torch_on_a_million_values(isa, dtype):
    """Round-to-nearest-even corner cases (odd ties, 1 in 65536 values for bf16) only show up
    in large tensors: one 1024 x 1024 rebuild with random fp32 per-group scales."""
    base = torch.randn(1024, 1024).to(dtype)
    packed, _ = make_signs(1, 1024, 1024)
    scales = torch.rand(1, 1024, 16) * 0.37
    w = ops.dequant_add_sign(base, packed, scales, torch.ones(1))
    torch.testing.assert_close(
        w, ops.reference.dequant_add_sign(base, packed, scales, torch.ones(1)), rtol=0, atol=0
    )
