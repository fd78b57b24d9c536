"""pack_signs / unpack_signs: native kernels against the reference, exactly."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops
from tests.conftest import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 8), (2, 3, 33), (5, 129), (17, 1000)])
def test_pack_unpack_match_reference(isa, dtype, shape):
    delta = torch.randn(shape).to(dtype)
    delta.view(-1)[::7] = 0.0  # zeros pack as +1
    packed = ops.pack_signs(delta)
    assert torch.equal(packed, ops.reference.pack_signs(delta))
    signs = ops.unpack_signs(packed, shape[-1], dtype)
    assert signs.dtype == dtype and signs.shape == delta.shape
    assert torch.equal(signs, ops.reference.unpack_signs(packed, shape[-1], dtype))
    assert torch.equal(signs, torch.where(delta >= 0, 1.0, -1.0).to(dtype))


def test_padding_bits_are_zero(isa):
    packed = ops.pack_signs(torch.ones(3, 13))  # every real bit set
    assert packed[:, 0].tolist() == [0xFF] * 3
    assert packed[:, 1].tolist() == [0x1F] * 3  # 5 real bits, 3 padding bits clear


def test_empty_rows(isa):
    assert ops.pack_signs(torch.randn(0, 9)).shape == (0, 2)
    assert ops.unpack_signs(torch.zeros(0, 2, dtype=torch.uint8), 9).shape == (0, 9)
