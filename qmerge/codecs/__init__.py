"""Delta codecs: how one task-vector tensor is stored (shared/DESIGN.md, "Bit layout").

base     Residual (from_dense / dequantize / parts), the registry, codec spec strings
sign     1-bit signs + per-row / per-tensor / per-group scales, optional calibration
lowrank  truncated (randomized) SVD factors: fixed rank, energy, or a global byte budget
dense    the delta in fp16 / bf16 / fp32
skip     nothing stored (zero or negligible deltas)
mask     a 1-bit mask + rescaler over a merged pack's shared delta (EMR merging)
auto     the cheapest of the above that meets an SQNR target
policy   which codec each tensor of each task gets (by module type, pattern, task)
"""

from qmerge.codecs import dense, lowrank, mask, sign, skip  # noqa: F401  (registers the codecs)
from qmerge.codecs.auto import AutoConfig, choose
from qmerge.codecs.base import (
    CODECS,
    Residual,
    codec,
    config_dict,
    load_residual,
    make_config,
    parse_spec,
    sqnr_db,
)
from qmerge.codecs.dense import DenseConfig, DenseResidual
from qmerge.codecs.lowrank import LowRankConfig, LowRankResidual
from qmerge.codecs.mask import MaskConfig, MaskResidual
from qmerge.codecs.policy import MODULE_TYPES, Policy, module_type
from qmerge.codecs.sign import SignConfig, SignResidual
from qmerge.codecs.skip import SkipConfig, SkipResidual

__all__ = [
    "CODECS",
    "MODULE_TYPES",
    "AutoConfig",
    "DenseConfig",
    "DenseResidual",
    "LowRankConfig",
    "LowRankResidual",
    "MaskConfig",
    "MaskResidual",
    "Policy",
    "Residual",
    "SignConfig",
    "SignResidual",
    "SkipConfig",
    "SkipResidual",
    "choose",
    "codec",
    "config_dict",
    "load_residual",
    "make_config",
    "module_type",
    "parse_spec",
    "sqnr_db",
]
