"""Merge methods over the task vectors of a pack (shared/DESIGN.md, "The ideas"):

task_arithmetic  λ Σ τ_t                                   (Ilharco et al. 2023)
ties             trim, elect sign, disjoint mean            (Yadav et al. 2023)
dare             random drop + rescale, then TA or TIES     (Yu et al. 2024)
lines            any static merge scaled with layer depth   (Wang et al. 2025)
emr              unified vector + per-task masks, rescalers (Huang et al. 2024)
twin             static merge + compressed per-task rest    (Lu et al. 2024)

Each method gives a shared delta and, where it has them, per-task exclusive parts;
`merge_pack(pack, out, "ties:density=0.2")` writes them as a new pack (build.py);
`shared_deltas(pack, "ties")` gives the shared delta in memory, a tensor at a time.
"""

from qmerge.merge import dare, emr, lines, task_arithmetic, ties, twin  # noqa: F401  (registers)
from qmerge.merge.base import METHODS, Merged, TensorCtx, make_config, method
from qmerge.merge.build import DEFAULT_SHARED_CODEC, merge_pack, shared_deltas
from qmerge.merge.spec import parse

__all__ = ["DEFAULT_SHARED_CODEC", "METHODS", "Merged", "TensorCtx", "make_config", "merge_pack",
           "method", "parse", "shared_deltas"]
