"""sign_linear: native fused and materialized paths against the fp32 reference."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops
from tests.conftest import DTYPES
from tests.ops.helpers import assert_within_eager, make_signs, route_coeffs, sign_eager

CASES = [  # (rows N, out, in, tasks T, groups)
    (1, 16, 24, 1, 1),
    (3, 9, 13, 2, 1),
    (5, 32, 77, 3, 4),
    (8, 40, 64, 8, 1),
    (9, 17, 100, 5, 3),
    (30, 24, 45, 4, 1),
    (64, 20, 40, 2, 2),
    (300, 12, 33, 8, 1),
]


def check(x, base, packed, scales, bias=None, **route):
    y = ops.sign_linear(x, base, packed, scales, bias=bias, **route)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], base.shape[0])
    exact = ops.reference.sign_linear(
        x.float(),
        base.float(),
        packed,
        scales,
        bias=None if bias is None else bias.float(),
        **{k: (v.float() if k == "coeffs" else v) for k, v in route.items()},
    )
    c = route_coeffs(route, x.shape[0], packed.shape[0])
    assert_within_eager(y, exact, sign_eager(x, base, packed, scales, c, bias), str(route.keys()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_task_ids(isa, dtype, case):
    rows, out, inn, tasks, groups = case
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, groups=groups)
    x = torch.randn(rows, inn).to(dtype)
    ids = torch.randint(-1, tasks, (rows,))  # -1: the bare base
    check(x, base, packed, scales, task_ids=ids)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_coeff_mixtures(isa, dtype, case):
    rows, out, inn, tasks, groups = case
    base = torch.randn(out, inn).to(dtype)
    packed, scales = make_signs(tasks, out, inn, scale_rows=1 if tasks % 2 else None, groups=groups)
    x = torch.randn(rows, inn).to(dtype)
    coeffs = torch.rand(rows, tasks) * (torch.rand(rows, tasks) > 0.4)  # some rows: no task
    bias = torch.randn(out)
    check(x, base, packed, scales, bias=bias, coeffs=coeffs)


def test_wide_mixture_goes_materialized(isa):
    """More than 8 tasks in one row's mixture leaves the fused kernel; same result."""
    base = torch.randn(24, 40)
    packed, scales = make_signs(12, 24, 40)
    x = torch.randn(3, 40)
    check(x, base, packed, scales, coeffs=torch.rand(3, 12))


@pytest.mark.parametrize("rows", [1, 5, 8])
def test_mixed_batch_equals_each_row_alone(isa, rows):
    """The batched fused path is the per-row loop, exactly (same accumulation order)."""
    base = torch.randn(33, 70).to(torch.bfloat16)
    packed, scales = make_signs(4, 33, 70, groups=3)
    x = torch.randn(rows, 70).to(torch.bfloat16)
    ids = torch.randint(-1, 4, (rows,))
    y = ops.sign_linear(x, base, packed, scales, task_ids=ids)
    alone = torch.cat(
        [
            ops.sign_linear(x[n : n + 1], base, packed, scales, task_ids=ids[n : n + 1])
            for n in range(rows)
        ]
    )
    assert torch.equal(y, alone)


def test_one_hot_coeffs_equal_task_ids(isa):
    base = torch.randn(16, 48)
    packed, scales = make_signs(3, 16, 48)
    x = torch.randn(6, 48)
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    c = torch.zeros(6, 3)
    c[ids >= 0, ids[ids >= 0]] = 1.0
    torch.testing.assert_close(
        ops.sign_linear(x, base, packed, scales, task_ids=ids),
        ops.sign_linear(x, base, packed, scales, coeffs=c),
    )


def test_no_rows(isa):
    base = torch.randn(4, 8)
    packed, scales = make_signs(1, 4, 8)
    y = ops.sign_linear(
        torch.randn(0, 8), base, packed, scales, task_ids=torch.zeros(0, dtype=torch.long)
    )
    assert y.shape == (0, 4)
