import pytest
import torch

from qmerge.codecs import LowRankConfig, LowRankResidual, sqnr_db
from qmerge.codecs.lowrank import allocate_ranks, spectrum
from qmerge.errors import ConfigError


def _lowrank_delta(out=40, cols=30, rank=5, noise=1e-4):
    return torch.randn(out, rank) @ torch.randn(rank, cols) * 0.01 + noise * torch.randn(out, cols)


def test_full_rank_gives_the_delta_back():
    d = torch.randn(40, 30)
    r = LowRankResidual.from_dense(d, LowRankConfig(rank=30, factor_dtype="fp32"))
    assert r.rank == 30
    torch.testing.assert_close(r.dequantize(), d, rtol=1e-4, atol=1e-5)


def test_fixed_rank_is_the_best_rank_r_approximation():
    d = torch.randn(40, 30)
    r = LowRankResidual.from_dense(d, LowRankConfig(rank=4, factor_dtype="fp32"))
    s = torch.linalg.svdvals(d)
    err = float((d - r.dequantize()).pow(2).sum())
    assert err == pytest.approx(float(s[4:].pow(2).sum()), rel=1e-4)  # Eckart-Young


def test_energy_picks_the_smallest_rank_that_reaches_it():
    d = torch.randn(40, 30)
    s2 = torch.linalg.svdvals(d).double() ** 2
    kept = s2.cumsum(0) / s2.sum()
    for energy in (0.3, 0.8, 0.99):
        r = LowRankResidual.from_dense(d, LowRankConfig(energy=energy, factor_dtype="fp32"))
        assert kept[r.rank - 1] >= energy and (r.rank == 1 or kept[r.rank - 2] < energy)


def test_randomized_svd_matches_exact_on_a_low_rank_matrix():
    d = _lowrank_delta(out=300, cols=200, rank=6, noise=0)
    exact = LowRankResidual.from_dense(
        d, LowRankConfig(rank=6, factor_dtype="fp32", randomized="never")
    )
    rand = LowRankResidual.from_dense(
        d, LowRankConfig(rank=6, factor_dtype="fp32", randomized="always")
    )
    torch.testing.assert_close(rand.dequantize(), exact.dequantize(), rtol=1e-3, atol=1e-6)
    again = LowRankResidual.from_dense(
        d, LowRankConfig(rank=6, factor_dtype="fp32", randomized="always")
    )
    assert torch.equal(again.U, rand.U)  # seeded: the same input gives the same factors


@pytest.mark.parametrize("dt", ["bf16", "fp16", "int8"])
def test_factor_dtypes_round_trip(dt):
    d = _lowrank_delta()
    cfg = LowRankConfig(rank=5, factor_dtype=dt)
    r = LowRankResidual.from_dense(d, cfg)
    again = LowRankResidual.from_parts(r.parts(), cfg, tuple(d.shape), r.info())
    assert torch.equal(again.dequantize(), r.dequantize())
    db = sqnr_db(float(d.pow(2).sum()), r.error_energy(d))
    assert db > 30  # a rank-5 delta (+ small noise): only factor rounding is lost
    if dt == "int8":
        assert set(r.parts()) == {"U", "V", "U_scale", "V_scale"}
        assert r.nbytes == 40 * 5 + 5 * 30 + 4 * (40 + 5)


def test_budget_allocation_prefers_the_largest_components():
    spectra = [torch.tensor([10.0, 1.0]), torch.tensor([5.0, 4.0, 0.1])]
    assert allocate_ranks(spectra, [1, 1], budget=3) == [1, 2]
    assert allocate_ranks(spectra, [1, 2], budget=3) == [1, 1]  # cost per byte matters
    assert allocate_ranks(spectra, [1, 2], budget=4) == [2, 1]
    assert allocate_ranks(spectra, [1, 1], budget=0) == [0, 0]
    s = spectrum(torch.randn(20, 10), LowRankConfig(max_rank=4))
    assert s.shape == (4,)


def test_config_validation():
    with pytest.raises(ConfigError):
        LowRankConfig(rank=0)
    with pytest.raises(ConfigError):
        LowRankConfig(energy=1.5)
    with pytest.raises(ConfigError, match="at most one"):
        LowRankConfig(energy=0.5, budget_bits=2)
    with pytest.raises(ConfigError, match="factor_dtype"):
        LowRankConfig(factor_dtype="int4")
