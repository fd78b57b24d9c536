"""Each merge method against its formula, written out here independently on small tensors."""

from __future__ import annotations

import pytest
import torch

from qmerge.codecs.mask import MaskResidual
from qmerge.errors import ConfigError
from qmerge.merge import METHODS, TensorCtx, make_config, parse
from qmerge.merge.base import layer_index

TASKS = ("a", "b", "c")


def ctx(name="encoder.layer.1.attention.self.query.weight", depth=1, layers=4, seed=0):
    return TensorCtx(name, depth, layers, TASKS, seed)


def run(name: str, deltas, **opts):
    return METHODS[name].fn(deltas, make_config(name, opts), ctx())


def test_task_arithmetic_is_scaled_sum():
    d = torch.randn(3, 5, 7)
    out = run("task_arithmetic", d, scale=0.4)
    torch.testing.assert_close(out.shared, 0.4 * (d[0] + d[1] + d[2]))
    assert out.exclusive is None


def test_ties_by_hand():
    # 3 tasks, 4 entries; density 0.5 keeps each task's 2 largest magnitudes
    d = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 2.0, 0.1, 1.0], [1.0, 0.2, -3.0, 5.0]])
    # trimmed: a [3, 0, 0, -4], b [-2, 2, 0, 0], c [0, 0, -3, 5]
    # elected sign of the sums [1, 2, -3, 1] -> [+, +, -, +]
    # disjoint means: [3, 2, -3, 5]
    out = run("ties", d, density=0.5, scale=1.0)
    torch.testing.assert_close(out.shared, torch.tensor([3.0, 2.0, -3.0, 5.0]))
    out = run("ties", d, density=0.5, scale=0.5)
    torch.testing.assert_close(out.shared, torch.tensor([1.5, 1.0, -1.5, 2.5]))


def test_dare_is_seeded_unbiased_and_drops_p():
    d = torch.randn(3, 200, 300)
    a = run("dare", d, drop=0.7, seed=5, scale=1.0)
    b = run("dare", d, drop=0.7, seed=5, scale=1.0)
    c = run("dare", d, drop=0.7, seed=6, scale=1.0)
    torch.testing.assert_close(a.shared, b.shared)
    assert not torch.equal(a.shared, c.shared)
    # one task alone: survivors are rescaled by 1/(1-p), the rest are 0
    one = run("dare", d[:1], drop=0.7, seed=5, scale=1.0).shared
    kept = one != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(one[kept], d[0][kept] / 0.3)
    # unbiased: the mean over entries of (dare - sum) is ~0 relative to the spread
    assert abs((a.shared - d.sum(0)).mean().item()) < 0.05


def test_lines_scales_with_depth():
    d = torch.randn(3, 4, 4)
    cfg = make_config("lines", {"alpha": 0.1, "beta": 0.6})
    fn = METHODS["lines"].fn
    s = d.sum(0)
    for depth, want in ((0, 0.1), (3, 0.7), (1, 0.1 + 0.6 / 3)):
        out = fn(d, cfg, TensorCtx(f"encoder.layer.{depth}.output.dense.weight", depth, 4, TASKS))
        torch.testing.assert_close(out.shared, want * s)
    emb = fn(d, cfg, TensorCtx("embeddings.word_embeddings.weight", None, 4, TASKS))
    torch.testing.assert_close(emb.shared, 0.1 * s)
    # alpha defaults to 1/T; inner can be TIES
    out = fn(d, make_config("lines", {"inner": "ties:density=1.0"}), ctx(depth=0))
    torch.testing.assert_close(
        out.shared, METHODS["ties"].fn(d, make_config("ties", {"density": 1.0}), ctx()).shared / 3
    )


def test_emr_unified_masks_and_rescalers():
    d = torch.tensor([[1.0, -2.0, 3.0], [2.0, 1.0, -1.0]])
    out = METHODS["emr"].fn(d, make_config("emr", {}), ctx())
    # signs of the sums [3, -1, 2] -> [+, -, +]; largest agreeing magnitudes [2, 2, 3]
    torch.testing.assert_close(out.shared, torch.tensor([2.0, -2.0, 3.0]))
    m0, m1 = out.exclusive
    assert isinstance(m0, MaskResidual)
    # task 0 agrees everywhere: λ0 = 6 / 7; task 1 only at entry 0: λ1 = 4 / 2
    assert float(m0.scale) == pytest.approx(6 / 7)
    assert float(m1.scale) == pytest.approx(2.0)
    # read back as the part over the backbone: (λ M - 1) ⊙ τ_uni
    torch.testing.assert_close(out.shared + m0.dequantize(), 6 / 7 * torch.tensor([2.0, -2, 3]))
    torch.testing.assert_close(out.shared + m1.dequantize(), torch.tensor([4.0, 0, 0]))


def test_twin_shared_plus_exclusive_is_each_task():
    d = torch.randn(3, 6, 8)
    out = run("twin", d, shared="task_arithmetic:scale=0.3")
    torch.testing.assert_close(out.shared, 0.3 * d.sum(0))
    for t in range(3):
        torch.testing.assert_close(out.shared + out.exclusive[t], d[t])


def test_bad_options_name_the_field():
    with pytest.raises(ConfigError, match="density"):
        make_config("ties", {"density": "1.5"})
    with pytest.raises(ConfigError, match="drop"):
        make_config("dare", {"drop": 1.0})
    with pytest.raises(ConfigError, match="no option 'lambda'"):
        make_config("task_arithmetic", {"lambda": 1})
    with pytest.raises(ConfigError, match="unknown merge method 'soup'"):
        parse("soup")
    with pytest.raises(ConfigError, match="static merge"):
        make_config("twin", {"shared": "emr"})
    with pytest.raises(ConfigError, match="combine"):
        make_config("dare", {"combine": "mean"})


def test_layer_index():
    assert layer_index("encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_index("embeddings.word_embeddings.weight") is None
