"""qmerge ops: the contract (schemas, fake kernels, reference) and the native kernels.

Every op is also reachable as ``torch.ops.qmerge.<name>``. See shared/DESIGN.md "Ops".
"""

from qmerge.ops import _extension, reference
from qmerge.ops._extension import active_isa, backend, native_available, set_isa, supported_isas
from qmerge.ops.contract import (
    SCHEMAS,
    dequant_add_sign,
    lowrank_linear,
    pack_signs,
    sign_linear,
    unpack_signs,
)

_extension.load()

__all__ = [
    "SCHEMAS",
    "active_isa",
    "backend",
    "dequant_add_sign",
    "lowrank_linear",
    "native_available",
    "pack_signs",
    "reference",
    "set_isa",
    "sign_linear",
    "supported_isas",
    "unpack_signs",
]
