"""Merge methods over the task vectors of a pack (shared/DESIGN.md, "The ideas"):

task_arithmetic  λ Σ τ_t                                   (Ilharco et al. 2023)
ties             trim, elect sign, disjoint mean            (Yadav et al. 2023)
dare             random drop + rescale, then TA or TIES     (Yu et al. 2024)
lines            any static merge scaled with layer depth   (Wang et al. 2025)
emr              unified vector + per-task masks, rescalers (Huang et al. 2024)
twin             static merge + compressed per-task rest    (Lu et al. 2024)
gta              per-task weights, sparsify, consensus      (mergekit's family)
breadcrumbs      drop outliers and small entries (+ _ties)  (Davari & Belilovsky 2024)
della            MAGPRUNE, elect sign (della_linear: sum)   (Deep et al. 2024)
linear           weighted average of models (model soup)    (Wortsman et al. 2022)
model_stock      average pulled back by the tasks' angle    (Jang et al. 2024)
slerp            spherical interpolation of two endpoints   (Shoemake 1985)

Each method gives a shared delta and, where it has them, per-task exclusive parts;
Algorithms only: building a merged pack from them is the verb `qmerge.verbs.merge`.
"""

from qmerge.merge import (  # noqa: F401  (registers)
    breadcrumbs,
    dare,
    della,
    emr,
    gta,
    linear,
    lines,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
    twin,
)
from qmerge.merge.base import METHODS, Merged, MethodChoice, TensorCtx, make_config, method
from qmerge.merge.spec import parse

__all__ = ["METHODS", "Merged", "MethodChoice", "TensorCtx", "make_config", "method", "parse"]
