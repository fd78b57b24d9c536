"""Merge methods over the task vectors of a pack (shared/DESIGN.md, "The ideas"):

task_arithmetic  λ Σ τ_t                                   (Ilharco et al. 2023)
ties             trim, elect sign, disjoint mean            (Yadav et al. 2023)
dare             random drop + rescale, then TA or TIES     (Yu et al. 2024)
lines            any static merge scaled with layer depth   (Wang et al. 2025)
emr              unified vector + per-task masks, rescalers (Huang et al. 2024)
twin             static merge + compressed per-task rest    (Lu et al. 2024)

Each method gives a shared delta and, where it has them, per-task exclusive parts;
Algorithms only: building a merged pack from them is the verb `qmerge.verbs.merge`.
"""

from qmerge.merge import dare, emr, lines, task_arithmetic, ties, twin  # noqa: F401  (registers)
from qmerge.merge.base import METHODS, Merged, MethodChoice, TensorCtx, make_config, method
from qmerge.merge.spec import parse

__all__ = ["METHODS", "Merged", "MethodChoice", "TensorCtx", "make_config", "method", "parse"]
