"""Bad inputs raise an error whose message names the argument, on every backend."""

from __future__ import annotations

import pytest
import torch

from qmerge import ops

OUT, IN, T = 6, 20, 3


def good():
    return dict(
        x=torch.randn(4, IN),
        base_w=torch.randn(OUT, IN),
        packed=ops.reference.pack_signs(torch.randn(T, OUT, IN)),
        scales=torch.rand(T, OUT, 1),
        U=torch.randn(T, OUT, 5),
        V=torch.randn(T, 5, IN),
        task_ids=torch.tensor([0, 1, -1, 2]),
    )


def sign_linear(a, **kw):
    kw = {"task_ids": a["task_ids"], **kw}
    return torch.ops.qmerge.sign_linear(a["x"], a["base_w"], a["packed"], a["scales"], **kw)


def lowrank_linear(a, **kw):
    kw = {"task_ids": a["task_ids"], **kw}
    return torch.ops.qmerge.lowrank_linear(a["x"], a["base_w"], a["U"], a["V"], **kw)


def dequant(a, **kw):
    args = dict(base=a["base_w"], packed=a["packed"], scales=a["scales"], alphas=torch.ones(T))
    args.update(kw)
    return torch.ops.qmerge.dequant_add_sign(**args)


BAD = {  # name: (call, expected exception, argument named in the message)
    "x wrong dtype": (lambda a: sign_linear({**a, "x": a["x"].double()}), TypeError, "'x'"),
    "x int": (lambda a: lowrank_linear({**a, "x": a["x"].long()}), TypeError, "'x'"),
    "base_w dtype != x": (
        lambda a: sign_linear({**a, "base_w": a["base_w"].half()}),
        TypeError,
        "'base_w'",
    ),
    "base_w columns": (
        lambda a: sign_linear({**a, "base_w": torch.randn(OUT, IN + 1)}),
        ValueError,
        "'base_w'",
    ),
    "packed dtype": (
        lambda a: sign_linear({**a, "packed": a["packed"].int()}),
        TypeError,
        "'packed'",
    ),
    "packed shape": (
        lambda a: sign_linear({**a, "packed": a["packed"][:, :, :-1].contiguous()}),
        ValueError,
        "'packed'",
    ),
    "scales tasks": (
        lambda a: sign_linear({**a, "scales": torch.rand(T + 1, OUT, 1)}),
        ValueError,
        "'scales'",
    ),
    "scales rows": (
        lambda a: sign_linear({**a, "scales": torch.rand(T, OUT - 1, 1)}),
        ValueError,
        "'scales'",
    ),
    "scales groups": (
        lambda a: dequant(a, scales=torch.rand(T, OUT, IN + 1)),
        ValueError,
        "'scales'",
    ),
    "task id too large": (
        lambda a: sign_linear(a, task_ids=torch.tensor([0, 1, 3, 0])),
        IndexError,
        "'task_ids'",
    ),
    "task id below -1": (
        lambda a: lowrank_linear(a, task_ids=torch.tensor([0, -2, 0, 0])),
        IndexError,
        "'task_ids'",
    ),
    "task ids length": (
        lambda a: sign_linear(a, task_ids=torch.tensor([0, 1])),
        ValueError,
        "'task_ids'",
    ),
    "task ids float": (lambda a: sign_linear(a, task_ids=torch.zeros(4)), TypeError, "'task_ids'"),
    "both routes": (lambda a: sign_linear(a, coeffs=torch.rand(4, T)), ValueError, "'coeffs'"),
    "no route": (lambda a: sign_linear(a, task_ids=None), ValueError, "'task_ids'"),
    "coeffs shape": (
        lambda a: sign_linear(a, task_ids=None, coeffs=torch.rand(4, T + 1)),
        ValueError,
        "'coeffs'",
    ),
    "bias shape": (lambda a: sign_linear(a, bias=torch.rand(OUT + 1)), ValueError, "'bias'"),
    "negative rank": (lambda a: lowrank_linear(a, rank=-1), ValueError, "'rank'"),
    "rank above stored": (lambda a: lowrank_linear(a, rank=6), ValueError, "'rank'"),
    "V mismatch": (lambda a: lowrank_linear({**a, "V": torch.randn(T, 4, IN)}), ValueError, "'V'"),
    "x non-contiguous": (
        lambda a: sign_linear({**a, "x": torch.randn(IN, 4).t()}),
        ValueError,
        "'x'",
    ),
    "base_w non-contiguous": (
        lambda a: lowrank_linear({**a, "base_w": torch.randn(IN, OUT).t()}),
        ValueError,
        "'base_w'",
    ),
    "packed non-contiguous": (
        lambda a: dequant(a, packed=a["packed"].transpose(0, 1).contiguous().transpose(0, 1)),
        ValueError,
        "'packed'",
    ),
    "alphas length": (lambda a: dequant(a, alphas=torch.ones(T - 1)), ValueError, "'alphas'"),
    "out shape": (
        lambda a: torch.ops.qmerge.dequant_add_sign_out(
            a["base_w"], a["packed"], a["scales"], torch.ones(T), torch.empty(OUT, IN - 1)
        ),
        ValueError,
        "'out'",
    ),
    "delta int": (
        lambda a: torch.ops.qmerge.pack_signs(torch.ones(3, 4, dtype=torch.int32)),
        TypeError,
        "'delta'",
    ),
    "unpack width": (
        lambda a: torch.ops.qmerge.unpack_signs(a["packed"], IN + 8),
        ValueError,
        "'packed'",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("kernel", ["dispatch", "reference"])
def test_bad_input_names_the_argument(name, kernel, monkeypatch):
    call, exc, arg = BAD[name]
    if kernel == "reference":
        # Route torch.ops.qmerge.* to the Python reference directly.
        class Ref:
            def __getattr__(self, op):
                return getattr(ops.reference, op)

        monkeypatch.setattr(torch.ops, "qmerge", Ref())
    with pytest.raises(exc, match=arg):
        call(good())
