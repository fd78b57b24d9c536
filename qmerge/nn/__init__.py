"""Runtime layers: a model patched with a pack answers every task, per row of a batch.

bank.py             every task's residual of one weight, stacked for the fused ops
delta_linear.py     DeltaLinear (nn.Linear or bitsandbytes base + residuals)
delta_embedding.py  DeltaEmbedding (rows gathered per token)
delta_params.py     DeltaParams (norms: per-row parameters)
task_head.py        TaskHead (per-task classifiers)
cache.py            the byte-bounded LRU of merged weights
context.py, rows.py the active route, and its rows for one layer
features.py         router features from a partial base forward
patch.py            patching, the routed forward/generate, unload
"""

from qmerge.nn.delta_embedding import DeltaEmbedding
from qmerge.nn.delta_linear import DeltaLinear
from qmerge.nn.delta_params import DeltaParams
from qmerge.nn.patch import Patched, patch
from qmerge.nn.task_head import TaskHead

__all__ = ["DeltaEmbedding", "DeltaLinear", "DeltaParams", "Patched", "TaskHead", "patch"]
