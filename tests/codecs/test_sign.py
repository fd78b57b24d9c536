import math

import pytest
import torch

from qmerge import ops
from qmerge.codecs import SignConfig, SignResidual, parse_spec
from qmerge.errors import ConfigError


def _delta(out=24, cols=50):
    return torch.randn(out, cols) * 0.01


@pytest.mark.parametrize("cols", [50, 64, 129])
def test_per_row_scale_is_the_row_mean_of_abs(cols):
    d = _delta(cols=cols)
    r = SignResidual.from_dense(d, SignConfig(scale_dtype="fp32"))
    torch.testing.assert_close(r.scales[:, 0], d.abs().mean(1), rtol=1e-6, atol=0)
    assert torch.equal(r.signs, ops.pack_signs(d))
    want = d.abs().mean(1, keepdim=True) * torch.where(d >= 0, 1.0, -1.0)
    torch.testing.assert_close(r.dequantize(), want, rtol=1e-6, atol=0)


def test_per_tensor_scale_is_the_tensor_mean_of_abs():
    d = _delta()
    r = SignResidual.from_dense(d, SignConfig(granularity="tensor", scale_dtype="fp32"))
    assert r.scales.shape == (1, 1)
    torch.testing.assert_close(r.scales[0, 0], d.abs().mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cols,group", [(64, 16), (50, 16), (130, 32)])
def test_per_group_scale_is_the_group_mean_of_abs(cols, group):
    d = _delta(cols=cols)
    r = SignResidual.from_dense(d, SignConfig("group", group, "fp32"))
    groups = math.ceil(cols / group)
    gs = math.ceil(cols / groups)  # the ops' layout
    assert r.scales.shape == (24, groups)
    for g in range(groups):
        torch.testing.assert_close(
            r.scales[:, g], d[:, g * gs : (g + 1) * gs].abs().mean(1), rtol=1e-6, atol=0
        )
    # the stored layout is what the op consumes
    base = torch.zeros(24, cols)
    w = ops.dequant_add_sign(base, r.signs[None], r.scales[None].float(), torch.ones(1))
    torch.testing.assert_close(w, r.dequantize(), rtol=0, atol=0)


def test_round_trip_through_parts_and_scale_dtypes():
    d = _delta()
    for dt in ("bf16", "fp16", "fp32"):
        cfg = SignConfig(scale_dtype=dt)
        r = SignResidual.from_dense(d, cfg)
        again = SignResidual.from_parts(r.parts(), cfg, tuple(d.shape), r.info())
        assert torch.equal(again.dequantize(), r.dequantize())
        # bf16 scales round the L2-optimal scale by at most 2^-8 relative
        torch.testing.assert_close(r.scales.float()[:, 0], d.abs().mean(1), rtol=2**-8, atol=0)


def test_bits_per_param_with_per_row_bf16_scales():
    d = torch.randn(64, 576)  # SmolLM2's hidden size
    r = SignResidual.from_dense(d, SignConfig())
    assert r.nbytes * 8 / d.numel() == pytest.approx(1 + 16 / 576)
    assert r.nbytes * 8 / d.numel() <= 1.05


def test_vectors_and_higher_rank_tensors():
    v = torch.randn(10)
    r = SignResidual.from_dense(v, SignConfig(scale_dtype="fp32"))
    assert r.dequantize().shape == (10,)
    torch.testing.assert_close(r.dequantize().abs(), v.abs().mean().expand(10))
    conv = torch.randn(4, 3, 2, 2)
    assert SignResidual.from_dense(conv, SignConfig()).dequantize().shape == conv.shape


@pytest.mark.parametrize("granularity", ["row", "tensor", "group"])
def test_calibrated_scales_minimise_the_layer_output_error(granularity):
    d = _delta(out=16, cols=64)
    x = torch.randn(32, 64) * torch.linspace(0.1, 3, 64)  # uneven feature scales
    cfg = SignConfig(granularity, 16, "fp32", calibrate=True)
    plain = SignResidual.from_dense(d, SignConfig(granularity, 16, "fp32"))
    cal = SignResidual.from_dense(d, cfg, calib=x)
    assert cal.calibrated and not plain.calibrated

    def err(r, scales=None):
        if scales is not None:
            r = SignResidual(r.signs, scales, r.shape)
        return float((x @ d.T - x @ r.dequantize().T).pow(2).sum())

    assert err(cal) < err(plain)
    for eps in (1e-3, -1e-3):  # a least-squares optimum: any nudge makes it worse
        assert err(cal, cal.scales * (1 + eps)) > err(cal)


def test_calibration_needs_matching_features():
    with pytest.raises(ConfigError, match="features"):
        SignResidual.from_dense(_delta(), SignConfig(calibrate=True), calib=torch.randn(4, 7))


def test_config_validation_and_specs():
    with pytest.raises(ConfigError, match="granularity"):
        SignConfig(granularity="column")
    with pytest.raises(ConfigError, match="group_size"):
        SignConfig(group_size=2)
    name, cfg = parse_spec("sign:granularity=group,group_size=64,calibrate=true")
    assert name == "sign" and cfg == SignConfig("group", 64, "bf16", True)
    with pytest.raises(ConfigError, match="no option 'rank'"):
        parse_spec("sign:rank=3")
    with pytest.raises(ConfigError, match="not a valid"):
        parse_spec("sign:group_size=big")
