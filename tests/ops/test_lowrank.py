"""lowrank_linear against the fp32 reference, and its invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qmerge import ops
from tests.conftest import DTYPES
from tests.ops.helpers import assert_within_eager


def factors(tasks, out, inn, r, dtype):
    return (torch.randn(tasks, out, r) * 0.1).to(dtype), (torch.randn(tasks, r, inn) * 0.1).to(
        dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", [(1, 16, 24, 1, 4), (7, 33, 65, 3, 8), (20, 12, 40, 2, 16), (40, 9, 19, 5, 3)], ids=str
)
# runs / run_coeffs: rows in blocks of 5 (a prefill's sequences), which large batches compute on
# views of each task's runs instead of gathering them.
@pytest.mark.parametrize("route", ["ids", "coeffs", "runs", "run_coeffs"])
def test_matches_reference(isa, dtype, case, route):
    rows, out, inn, tasks, r = case
    base = torch.randn(out, inn).to(dtype)
    U, V = factors(tasks, out, inn, r, dtype)
    x = torch.randn(rows, inn).to(dtype)
    bias = torch.randn(out)
    block = torch.arange(rows) // 5
    kw = {
        "ids": lambda: {"task_ids": torch.randint(-1, tasks, (rows,))},
        "coeffs": lambda: {"coeffs": torch.randn(rows, tasks) * (torch.rand(rows, tasks) > 0.3)},
        "runs": lambda: {"task_ids": block % (tasks + 1) - 1},
        "run_coeffs": lambda: {
            "coeffs": (torch.randn(rows, tasks) * (torch.rand(rows, tasks) > 0.3))[block]
        },
    }[route]()
    for rank in (None, max(r - 2, 0)):
        y = ops.lowrank_linear(x, base, U, V, bias=bias, rank=rank, **kw)
        exact = ops.reference.lowrank_linear(
            x.float(), base.float(), U.float(), V.float(), bias=bias, rank=rank, **kw
        )
        # eager torch: each row's merged weight in x's dtype, then F.linear
        rk = r if rank is None else rank
        c = (
            torch.nn.functional.one_hot(kw["task_ids"].clamp(min=0), tasks).float()
            * (kw["task_ids"] >= 0)[:, None]
            if "task_ids" in kw
            else kw["coeffs"]
        )
        deltas = U[:, :, :rk].float() @ V[:, :rk].float()
        w = base.float()[None] + torch.einsum("nt,toi->noi", c, deltas)
        eager = torch.stack(
            [F.linear(x[n : n + 1], w[n].to(dtype), bias.to(dtype))[0] for n in range(rows)]
        )
        assert_within_eager(y, exact, eager, f"rank={rank}")


def test_full_rank_gives_back_the_delta(isa):
    base = torch.randn(12, 10, dtype=torch.float64).float()
    delta = torch.randn(12, 10) * 0.05
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    U, V = (u * s)[None].contiguous(), vh[None].contiguous()
    x = torch.randn(4, 10)
    y = ops.lowrank_linear(x, base, U, V, task_ids=torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(y, F.linear(x, base + delta), rtol=1e-5, atol=1e-5)


def test_rank_zero_is_the_base(isa):
    base = torch.randn(8, 16)
    U, V = factors(2, 8, 16, 4, torch.float32)
    x = torch.randn(3, 16)
    y = ops.lowrank_linear(x, base, U, V, task_ids=torch.tensor([0, 1, 1]), rank=0)
    torch.testing.assert_close(y, F.linear(x, base), rtol=1e-5, atol=1e-5)
