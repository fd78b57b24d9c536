"""Extension points: a codec and a merge method registered here, in the test, with no edit
anywhere else, show up in the CLI's --help, compress and merge packs, and the codec's residuals
run on the fused path (a sign bank over its runtime form), matching the dense reference."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import qmerge
from qmerge.cli import main
from qmerge.codecs import CODECS, Residual, sqnr_db
from qmerge.codecs.base import as_matrix, expect_part, register
from qmerge.codecs.runtime import SignForm
from qmerge.errors import ConfigError
from qmerge.merge import METHODS
from qmerge.merge.base import Merged, TensorCtx
from qmerge.merge.base import register as register_method
from qmerge.nn.bank import SignBank
from qmerge.nn.delta_linear import DeltaLinear
from qmerge.verbs.packs import shared_residual
from tests.nn import tiny


@dataclass(frozen=True)
class ToyConfig:
    """Attributes:
    shrink: the scale is mean(|τ|) times this (default 1.0).
    """

    shrink: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.shrink) and self.shrink > 0):
            raise ConfigError(f"ToyConfig.shrink must be > 0, got {self.shrink}")


class ToyResidual(Residual):
    """1 bit per weight with one fp32 scale per tensor, stored under its own part names."""

    def __init__(self, bits: torch.Tensor, s: torch.Tensor, shape: tuple[int, ...]):
        self.bits, self.s, self.shape = bits, s, tuple(shape)

    @classmethod
    def from_dense(cls, delta, cfg: ToyConfig, calib=None) -> ToyResidual:
        m = as_matrix(delta.float())
        s = (m.abs().mean() * cfg.shrink).reshape(1, 1)
        return cls(qmerge.ops.pack_signs(m), s, tuple(delta.shape))

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor], cfg: ToyConfig, shape, info: Any):
        out, cols = as_matrix(torch.empty(shape, device="meta")).shape
        bits = expect_part(parts, "bits", (out, (cols + 7) // 8), (torch.uint8,), "toy1bit")
        return cls(bits, expect_part(parts, "s", (1, 1), (torch.float32,), "toy1bit"), shape)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"bits": self.bits, "s": self.s}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        cols = as_matrix(torch.empty(self.shape, device="meta")).shape[1]
        signs = qmerge.ops.unpack_signs(self.bits, cols)
        return (signs * self.s).reshape(self.shape).to(dtype)

    def runtime_form(self) -> SignForm:
        return SignForm(self.bits, self.s)


@dataclass(frozen=True)
class ToyMeanConfig:
    """Attributes:
    weight: the mean of the task vectors is scaled by this (default 1.0).
    """

    weight: float = 1.0


def toy_mean(deltas: torch.Tensor, cfg: ToyMeanConfig, ctx: TensorCtx) -> Merged:
    return Merged(deltas.mean(0) * cfg.weight)


@pytest.fixture
def plugins():
    register("toy1bit", ToyConfig, "a toy 1-bit codec registered by a test")(ToyResidual)
    register_method("toy_mean", ToyMeanConfig, "a toy merge: the weighted mean")(toy_mean)
    try:
        yield
    finally:
        CODECS.unregister("toy1bit")
        METHODS.unregister("toy_mean")


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines


def test_registered_names_appear_in_the_help(plugins):
    assert "toy1bit" in _help("compress") and "a toy 1-bit codec" in _help("compress")
    text = _help("merge")
    assert "toy_mean" in text and "the mean of the task vectors is scaled" in text
    CODECS.unregister("toy1bit")
    assert "toy1bit" not in _help("compress")


def test_a_name_is_registered_once(plugins):
    with pytest.raises(ConfigError, match="already registered"):
        register("toy1bit", ToyConfig)(ToyResidual)
    with pytest.raises(ConfigError, match="already registered"):
        register_method("ties", ToyMeanConfig, "x")(toy_mean)


def test_a_new_codec_compresses_and_runs_fused(plugins, tmp_path):
    base, fts = tiny.llama(tmp_path, tasks=2)
    pack = tmp_path / "pack"
    argv = ["compress", "--base", str(base), "--out", str(pack), "--quiet", "--json"]
    for name, path in fts.items():
        argv += ["--task", f"{name}={path}"]
    assert main([*argv, "--codec", "toy1bit:shrink=0.9"]) == 0
    entries = qmerge.open_pack(pack).entries("t0")
    matrices = [e for e in entries.values() if len(e["shape"]) == 2]
    assert matrices and all(e["codec"] == "toy1bit" for e in matrices)
    assert all(e["config"] == {"shrink": 0.9} for e in matrices)

    model = qmerge.load(base, pack, dtype=torch.float32, mode="fused")
    layers = [m for m in model.modules() if isinstance(m, DeltaLinear) and m.bank]
    assert layers and all(isinstance(b, SignBank) for m in layers for b in m.bank.banks)

    # the reference: the base with every task-0 residual added densely
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pk = qmerge.open_pack(pack)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name in pk.entries("t0"):
            p = params[name] if name in params else params[name.removeprefix("model.")]
            p.add_(qmerge.residual(pk, "t0", name).dequantize(torch.float32).reshape(p.shape))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids, task="t0").logits
        want = ref(input_ids=ids).logits
        mixed = model(input_ids=ids, task=["t0", "t1"]).logits
        alone = model(input_ids=ids[1:], task="t1").logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[0], got[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], alone[0], rtol=1e-5, atol=1e-5)
    db = min(e["sqnr_db"] for e in matrices)
    assert db is not None and db > 0 and sqnr_db(1.0, 0.5) > 0


def test_a_new_merge_method_runs_from_the_cli(plugins, tmp_path):
    base, fts = tiny.llama(tmp_path, tasks=2)
    pack = qmerge.compress(
        base, fts, tmp_path / "pack", opts=qmerge.Options(policy=tiny.EXACT, progress=False)
    ).path
    out = tmp_path / "merged"
    argv = [
        "merge",
        str(pack),
        "--method",
        "toy_mean",
        "--option",
        "weight=0.5",
        "--out",
        str(out),
        "--shared-codec",
        "dense:dtype=fp32",
        "--quiet",
        "--json",
    ]
    assert main(argv) == 0
    merged = qmerge.open_pack(out)
    assert merged.manifest["merge"]["method"] == "toy_mean"
    assert merged.manifest["merge"]["config"] == {"weight": 0.5}
    name = "model.layers.0.mlp.up_proj.weight"
    src = qmerge.open_pack(pack)
    want = (
        0.5
        * (
            qmerge.residual(src, "t0", name).dequantize()
            + qmerge.residual(src, "t1", name).dequantize()
        )
        / 2
    )
    got = dict(qmerge.shared_deltas(pack, "toy_mean:weight=0.5"))[name]
    torch.testing.assert_close(got, want)
    stored = shared_residual(merged, name).dequantize()
    torch.testing.assert_close(stored, want)
