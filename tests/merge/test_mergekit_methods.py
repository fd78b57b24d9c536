"""The merges mergekit users expect (gta, Breadcrumbs, DELLA, Model Stock, SLERP), each
against a small example of its formula worked out here by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qmerge.errors import ConfigError
from qmerge.merge import METHODS, TensorCtx, make_config

TASKS = ("a", "b", "c")


def run(name: str, deltas, base=None, **opts):
    ctx = TensorCtx("model.layers.0.mlp.up_proj.weight", 0, 2, TASKS[: len(deltas)], 0, base)
    return METHODS[name].fn(deltas, make_config(name, opts), ctx).shared


D = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 2.0, 0.1, 1.0], [1.0, 0.2, -3.0, 5.0]])


def test_gta_weighted_ties_by_hand():
    # density 0.5: a keeps [3, ., ., -4], b [-2, 2, ., .], c [., ., -3, 5]
    # weights 1, 2, 1 -> a [3, 0, 0, -4], b [-4, 4, 0, 0], c [0, 0, -3, 5]
    # sums [-1, 4, -3, 1] elect [-, +, -, +] (a sum >= 0 elects +)
    # agreeing: col0 b (-4, w 2) -> -4/2; col1 b 4/2; col2 c -3/1; col3 c 5/1
    out = run(
        "gta",
        D,
        sparsify="magnitude",
        consensus="sum",
        density=0.5,
        weights="1/2/1",
        normalize=True,
    )
    torch.testing.assert_close(out, torch.tensor([-2.0, 2.0, -3.0, 5.0]))
    # no normalize, lambda 0.5: the agreeing weighted sums, halved
    out = run(
        "gta", D, sparsify="magnitude", consensus="sum", density=0.5, weights="1/2/1", scale=0.5
    )
    torch.testing.assert_close(out, torch.tensor([-2.0, 2.0, -1.5, 2.5]))


def test_gta_linear_average_counts_the_base_weight():
    # mergekit's linear over base (weight 1) and a, b (weights 1, 2): (a + 2 b) / 4
    out = run("gta", D[:2], weights="1/2", normalize=True, base_weight=1.0)
    torch.testing.assert_close(out, (D[0] + 2 * D[1]) / 4)
    # the linear method: the same average, and with the base the full weights mixed
    torch.testing.assert_close(run("linear", D[:2], weights="1/2", base_weight=1.0), out)
    w0 = torch.tensor([1.0, -2.0, 0.5, 4.0])
    full = METHODS["linear"].fn(
        D[:2],
        make_config("linear", {"weights": "1/2", "base_weight": 1.0}),
        TensorCtx("w", None, 1, ("a", "b"), 0, w0),
    )
    want = (1 * w0 + 1 * (w0 + D[0]) + 2 * (w0 + D[1])) / 4
    torch.testing.assert_close(full.weight, want)
    torch.testing.assert_close(full.shared, want - w0)
    # not normalized: the weighted sum of whole models, which needs the base
    summed = METHODS["linear"].fn(
        D[:2],
        make_config("linear", {"normalize": False}),
        TensorCtx("w", None, 1, ("a", "b"), 0, w0),
    )
    torch.testing.assert_close(summed.weight, (w0 + D[0]) + (w0 + D[1]))
    with pytest.raises(ConfigError, match="needs the base"):
        run("linear", D[:2], normalize=False)
    with pytest.raises(ConfigError, match="gives 3 values for 2 tasks"):
        run("gta", D[:2], weights="1/2/3")


def test_breadcrumbs_drops_outliers_and_the_smallest():
    d = torch.arange(1.0, 11.0).reshape(1, 10) * torch.tensor([1, -1] * 5)
    # 10 entries, density 0.6 keeps 6, gamma 0.2 drops the 2 largest: |3|..|8| stay
    out = run("breadcrumbs", d, density=0.6, gamma=0.2)
    want = torch.where((d.abs() >= 3) & (d.abs() <= 8), d, 0.0)[0]
    torch.testing.assert_close(out, want)
    two = torch.cat([d, -d])  # with TIES: sums are 0 -> + elected; only positive entries agree
    out = run("breadcrumbs_ties", two, density=0.6, gamma=0.2)
    torch.testing.assert_close(out, want.abs() * (want != 0))


def test_della_keeps_large_entries_more_often_and_rescales():
    torch.manual_seed(0)
    d = torch.randn(1, 64, 4096)
    out = run("della_linear", d, density=0.5, epsilon=0.4, seed=3)
    again = run("della_linear", d, density=0.5, epsilon=0.4, seed=3)
    assert torch.equal(out, again)  # seeded
    kept = out != 0
    rank = d[0].abs().argsort(1).argsort(1)
    low, high = kept[rank < 400].float().mean(), kept[rank >= 4096 - 400].float().mean()
    assert abs(low - 0.15) < 0.03 and abs(high - 0.85) < 0.03  # density ∓ epsilon
    assert abs(kept.float().mean() - 0.5) < 0.01
    # survivors are scaled by one factor that restores the L1 norm
    ratio = out[kept] / d[0][kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    torch.testing.assert_close(out.abs().sum(), d.abs().sum())
    with pytest.raises(ConfigError, match="density ± epsilon"):
        make_config("della", {"density": 0.9, "epsilon": 0.2})


def test_model_stock_by_hand():
    # two orthogonal unit vectors: cos 0 -> t 0; two equal ones: cos 1 -> t 1
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(run("model_stock", torch.stack([a, b])), torch.zeros(2))
    torch.testing.assert_close(run("model_stock", torch.stack([a, a])), a)
    # 60 degrees: cos 0.5, t = 2*0.5 / (1 + 0.5) = 2/3; shared = 2/3 * mean
    c = torch.tensor([0.5, math.sqrt(3) / 2])
    out = run("model_stock", torch.stack([a, c]))
    torch.testing.assert_close(out, (a + c) / 2 * (2 / 3))
    # filter-wise: one angle per row
    rows = torch.stack([torch.stack([a, a]), torch.stack([a, b])])  # [T=2, rows=2, 2]
    out = run("model_stock", rows, filter_wise=True)
    torch.testing.assert_close(out, torch.stack([a, torch.zeros(2)]))


def test_slerp_by_hand():
    w0 = torch.tensor([1.0, 0.0])
    # one task: from the base [1, 0] to [0, 1] (90 degrees); t = 0.5 -> [cos 45, sin 45]
    tau = torch.tensor([[-1.0, 1.0]])
    out = run("slerp", tau, base=w0, t=0.5)
    r = math.sqrt(0.5)
    torch.testing.assert_close(w0 + out, torch.tensor([r, r]))
    # two tasks: endpoints w0 + tau_0 and w0 + tau_1; t = 0 is the first, 1 the second
    taus = torch.tensor([[0.0, 0.0], [-1.0, 1.0]])
    torch.testing.assert_close(w0 + run("slerp", taus, base=w0, t=0.0), w0)
    torch.testing.assert_close(w0 + run("slerp", taus, base=w0, t=1.0), torch.tensor([0.0, 1.0]))
    # nearly parallel endpoints: plain linear interpolation
    near = torch.tensor([[0.0, 0.0], [1.0, 0.001]])
    torch.testing.assert_close(
        w0 + run("slerp", near, base=w0, t=0.25), torch.tensor([1.25, 0.00025])
    )
    with pytest.raises(ConfigError, match="give --base"):
        run("slerp", tau, t=0.5)
    with pytest.raises(ConfigError, match="got 3 tasks"):
        run("slerp", D, base=torch.zeros(4), t=0.5)
