"""qmerge: one base model, many fine-tunes stored as 1-bit or low-rank task vectors, rebuilt or
applied on the fly by fused kernels. Architecture: shared/DESIGN.md."""

from qmerge import ops
from qmerge.api import (
    Options,
    Policy,
    add_task,
    compress,
    export,
    fit_router,
    inspect,
    load,
    merge_pack,
    open_pack,
    remove_task,
    residual,
    unload,
    verify,
)
from qmerge.errors import QmergeError

__version__ = "0.1.0"
__all__ = ["Options", "Policy", "QmergeError", "__version__", "add_task", "compress",
           "export", "fit_router", "inspect", "load", "merge_pack", "open_pack", "ops",
           "remove_task", "residual", "unload", "verify"]
