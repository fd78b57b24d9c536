"""The packed bit layout is fixed (shared/DESIGN.md): these bytes change only deliberately."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmerge import ops

# 2 rows x 11 columns (not a multiple of 8: the second byte has 5 padding bits).
DELTA = torch.tensor(
    [
        [0.5, -1.0, 2.0, 0.0, -0.0, -3.0, 1.0, 1.0, -1.0, 4.0, -2.0],
        [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, float("nan"), 1.0],
    ]
)
# Row 0: bits (LSB first) 1,0,1,1,1,0,1,1 -> 0b11011101 = 0xDD; then 0,1,0 -> 0b010 = 0x02.
# Row 1: 0,0,0,0,0,0,0,1 -> 0x80; then 1, NaN -> 0, 1 -> 0b101 = 0x05.
GOLDEN = [[0xDD, 0x02], [0x80, 0x05]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_golden_bytes(isa, dtype):
    packed = ops.pack_signs(DELTA.to(dtype))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == GOLDEN
    assert ops.reference.pack_signs(DELTA.to(dtype)).tolist() == GOLDEN


def test_matches_numpy_packbits_little():
    delta = torch.randn(5, 37)
    expected = np.packbits(delta.numpy() >= 0, axis=-1, bitorder="little")
    assert ops.pack_signs(delta).numpy().tolist() == expected.tolist()


def test_unpack_golden(isa):
    signs = ops.unpack_signs(torch.tensor(GOLDEN, dtype=torch.uint8), 11)
    expected = torch.where(DELTA >= 0, 1.0, -1.0)
    assert torch.equal(signs, expected)
