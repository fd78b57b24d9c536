"""DeltaEmbedding: an `nn.Embedding` plus every task's residual of its table, gathered per
token: e[n] = E0[id_n] + sum_t c[n, t] tau_t[id_n]."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from qmerge.nn import context, rows
from qmerge.nn.bank import WeightBank
from qmerge.nn.runtime import Runtime


class DeltaEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, weight: WeightBank, runtime: Runtime, name: str):
        super().__init__()
        self.base, self.bank, self.runtime, self.name = base, weight, runtime, name
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def extra_repr(self) -> str:
        return f"{self.name}: banks=[{', '.join(type(b).__name__ for b in self.bank.banks)}]"

    def forward(self, ids: Tensor) -> Tensor:
        route = context.active()
        if route is None or route.is_base():
            return self.base(ids)
        uniform = route.uniform()
        if ids.dim() >= 1 and ids.shape[0] == 1 and route.batch > 1 and not route.per_token:
            ids = ids.expand(route.batch, *ids.shape[1:])  # shared position ids, per-row deltas
        if uniform is not None and self.runtime.materialize(ids.numel()):
            w = self.runtime.cache.get(
                (id(self), tuple(round(float(v), 7) for v in uniform)),
                lambda: self.bank.merged(self.base.weight.detach(), uniform),
            )
            return F.embedding(ids, w, self.padding_idx)
        e = self.base(ids)
        shaped = ids.unsqueeze(-1)  # rows of the route: one per id
        tids, coeffs = rows.for_rows(route, shaped)
        c = rows.dense(tids, coeffs, len(route.tasks)).to(e.device)
        flat = ids.reshape(-1)
        return e + self.bank.gather(flat, c, e.dtype).reshape(e.shape)
