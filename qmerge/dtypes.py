"""The one map between the dtype names users write (CLI, specs, JSON) and torch dtypes."""

from __future__ import annotations

import torch

from qmerge.errors import ConfigError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def float_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype of 'fp32' / 'fp16' / 'bf16'; ConfigError naming `what` otherwise."""
    try:
        return FLOAT_DTYPES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"{what} must be one of {', '.join(FLOAT_DTYPES)}; got {name!r}"
        ) from None
