"""One tensor's delta through a parsed codec choice, and its entry in a pack's codec table
(the shape of manifest.py's ENTRY): what the compressor and the merge methods both write."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qmerge.codecs.auto import AutoConfig, choose
from qmerge.codecs.base import (
    CODECS,
    CodecChoice,
    Residual,
    codec,
    config_dict,
    parse_spec,
    sq_sum,
    sqnr_db,
)
from qmerge.codecs.skip import SkipConfig, SkipResidual


def amax(delta: Tensor) -> float:
    return max(float(delta.max()), -float(delta.min())) if delta.numel() else 0.0


def threads_matter(choice: CodecChoice) -> bool:
    """Whether encoding under `choice` may give other bytes at another intra-op thread count
    (`Residual.threads_matter`; for `auto`, that of any of its candidates)."""
    if choice.name == "auto":
        return any(threads_matter(parse_spec(c)) for c in choice.config.candidates)
    return choice.name in CODECS and codec(choice.name).residual.threads_matter


def encode(
    delta: Tensor,
    choice: CodecChoice,
    calib: Tensor | None = None,
    skip_below: float = 0.0,
    **kwargs: Any,
) -> tuple[Residual, Any, dict[str, Any]]:
    """(residual, its config, extra info) of `delta` under a parsed codec choice ("auto"
    picks); `kwargs` go to the codec's `from_dense` (what its `plan` decided). A delta whose
    largest magnitude is <= skip_below (0 by default: an all-zero delta) is `skip`."""
    name, cfg = choice
    if amax(delta) <= skip_below:
        return SkipResidual(tuple(delta.shape)), SkipConfig(), {}
    if isinstance(cfg, AutoConfig):
        res, chosen, _ = choose(delta, cfg, calib)
        return res, chosen, {"auto_sqnr_db": cfg.sqnr_db}
    return codec(name).residual.from_dense(delta, cfg, calib, **kwargs), cfg, {}


def entry(
    res: Residual,
    cfg: Any,
    kind: str,
    shape: list[int],
    dtype: str,
    delta: Tensor,
    stored: dict[str, Tensor],
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The table entry of `res` encoding `delta`: bytes of what is `stored`, SQNR, info."""
    signal, error = sq_sum(delta), res.error_energy(delta)
    return entry_of(
        res.codec,
        cfg,
        kind,
        shape,
        dtype,
        delta.numel(),
        stored,
        signal,
        error,
        res.info() | (info or {}),
    )


def entry_of(
    codec_name: str,
    cfg: Any,
    kind: str,
    shape: list[int],
    dtype: str,
    numel: int,
    stored: dict[str, Tensor],
    signal: float,
    error: float,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The table entry from its figures (`entry`, or the slices of a tensor put together)."""
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())
    return {
        "codec": codec_name,
        "config": config_dict(cfg),
        "module_type": kind,
        "shape": list(shape),
        "dtype": dtype,
        "params": numel,
        "bytes": nbytes,
        "bits_per_param": nbytes * 8 / numel if numel else 0.0,
        "sqnr_db": sqnr_db(signal, error),
        "info": info,
    }
