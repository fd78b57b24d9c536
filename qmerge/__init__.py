"""qmerge: one base model, many fine-tunes stored as 1-bit or low-rank task vectors, rebuilt or
applied on the fly by fused kernels. Architecture: shared/DESIGN.md."""

from qmerge import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
