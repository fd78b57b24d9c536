"""Each op passes torch.library.opcheck (schema, fake kernel, dispatch) on the active kernels."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops


def samples():
    out, inn, tasks = 6, 19, 3
    base = torch.randn(out, inn)
    packed = ops.pack_signs(torch.randn(tasks, out, inn))
    scales = torch.rand(tasks, out, 2)
    x = torch.randn(4, inn)
    ids = torch.tensor([0, 2, -1, 1])
    U, V = torch.randn(tasks, out, 3), torch.randn(tasks, 3, inn)
    return {
        "pack_signs": (torch.randn(5, inn),),
        "unpack_signs": (packed, inn, torch.bfloat16),
        "dequant_add_sign": (base, packed, scales, torch.rand(tasks)),
        "dequant_add_sign_out": (base, packed, scales, torch.rand(tasks), torch.empty_like(base)),
        "sign_linear": (x, base, packed, scales, ids, None, torch.randn(out)),
        "lowrank_linear": (x, base, U, V, None, torch.rand(4, tasks), None, 2),
    }


@pytest.mark.parametrize("name", list(ops.SCHEMAS))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.qmerge, name).default, samples()[name])


def test_every_op_has_a_reference_and_a_public_entry_point():
    for name in ops.SCHEMAS:
        assert callable(getattr(ops.reference, name))
        assert hasattr(torch.ops.qmerge, name)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 33, dtype=torch.bfloat16)
        base = torch.empty(10, 33, dtype=torch.bfloat16)
        packed = torch.empty(2, 10, 5, dtype=torch.uint8)
        scales = torch.empty(2, 10, 1)
        y = ops.sign_linear(x, base, packed, scales, task_ids=torch.zeros(7, dtype=torch.long))
        assert y.shape == (7, 10) and y.dtype == torch.bfloat16
        assert ops.pack_signs(torch.empty(3, 4, 17)).shape == (3, 4, 3)
