"""DeltaParams' fast way for norms whose output is their weight times a normalized input
(transformers' own RMSNorm classes): a mixed batch equals each row run with its own merged
weight, and a module that is not weight-scaled (Gemma's 1 + weight) keeps the grouped way."""

from __future__ import annotations

import torch
from torch import nn

from qmerge.nn import context
from qmerge.nn.delta_params import DeltaParams
from qmerge.routing.route import Route


class ScaledNorm(nn.Module):  # transformers' LlamaRMSNorm, in short
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


class OnePlusNorm(ScaledNorm):  # Gemma's: (1 + weight) scales the output
    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def run_rows(cls, dtype):
    torch.manual_seed(0)
    base = cls(24).to(dtype)
    deltas = {"weight": (torch.randn(3, 24) * 0.1).to(dtype)}
    layer = DeltaParams(base, deltas, "norm")
    x = torch.randn(4, 5, 24).to(dtype)
    ids = torch.tensor([2, 0, -1, 1])
    with context.using(Route(tasks=("a", "b", "c"), task_ids=ids)):
        y = layer(x)
    for n, t in enumerate(ids.tolist()):
        w = base.weight + (deltas["weight"][t] if t >= 0 else 0)
        alone = torch.func.functional_call(base, {"weight": w}, (x[n],))
        assert torch.equal(y[n], alone), (cls.__name__, n)
    return layer


def test_weight_scaled_norm_takes_the_fast_way_and_matches_each_row():
    for dtype in (torch.float32, torch.bfloat16):
        assert run_rows(ScaledNorm, dtype)._scaled is True


def test_one_plus_weight_norm_keeps_the_grouped_way():
    assert run_rows(OnePlusNorm, torch.float32)._scaled is False


def test_the_weight_one_copy_stays_out_of_the_model_and_follows_its_dtype():
    layer = run_rows(ScaledNorm, torch.float32)
    assert [n for n, _ in layer.named_parameters()] == ["base.weight"]
    assert set(layer.state_dict()) == {"base.weight"}
    layer.base.to(torch.bfloat16)
    layer.deltas = {"weight": layer.deltas["weight"].bfloat16()}
    x = torch.randn(2, 3, 24).bfloat16()
    with context.using(Route(tasks=("a", "b", "c"), task_ids=torch.tensor([1, 2]))):
        y = layer(x)
    w = layer.base.weight + layer.deltas["weight"][1]
    assert torch.equal(y[0], torch.func.functional_call(layer.base, {"weight": w}, (x[0],)))
