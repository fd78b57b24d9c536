"""Every task's residual of one base weight, stacked the way the fused ops take them.

Each residual declares its runtime form (codecs/runtime.py); forms with the same `stack_key`
share a bank, and `BANKS` says which bank stacks which form. A WeightBank holds, for one base
weight W0 [out, in] and the pack's T tasks:
  sign banks    packed [Ts, out, ceil(in/8)] + scales [Ts, R, G] (fp32), one bank per scale
                layout (tasks with per-tensor and per-row scales share one: R is widened);
  a low-rank bank  U [Tl, out, r], V [Tl, r, in] in W0's dtype, ranks padded with zeros;
  a dense bank     D [Td, out, in] in W0's dtype.
Zero residuals (no form) hold nothing. Each bank maps the pack's task index to its own
(`lookup`), so a route over the pack drives every bank. No codec class is named here: a new
codec that declares a SignForm or LowRankForm runs fused as it is.

Three ways to apply it (shared/DESIGN.md, "Runtime"):
  fused(x, ...)   y = x W0^T + sum_t c_t x tau_t^T per row: the first sign bank (else the
                  low-rank bank) runs its op with the base; other banks add delta-only terms;
  merged(alphas)  W0 + sum_t alpha_t tau_t, one weight for a uniform batch;
  gather(rows)    tau rows picked by index (embedding lookups).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qmerge import ops
from qmerge.codecs import Residual
from qmerge.codecs.runtime import DenseForm, Form, LowRankForm, SignForm
from qmerge.ops.reference import expand_scales


def _terms(tasks: Sequence[int], ids: Tensor | None, coeffs: Tensor | None):
    """(bank index, pack index, rows, fp32 coefficients) for each bank task some row uses."""
    for b, t in enumerate(tasks):
        if ids is not None:
            rows = (ids == t).nonzero().flatten()
            c = None
        else:
            assert coeffs is not None
            rows = (coeffs[:, t] != 0).nonzero().flatten()
            c = coeffs[rows, t].float()
        if rows.numel():
            yield b, t, rows, c


Memo = Callable[[Hashable, Callable[[], Any]], Any]


def _no_memo(_key: Hashable, make: Callable[[], Any]) -> Any:
    return make()


def _add_rows(y: Tensor, rows: Tensor, c: Tensor | None, term: Tensor) -> None:
    y.index_add_(0, rows, (term if c is None else term * c[:, None].to(term.dtype)).to(y.dtype))


class _Bank:
    fused_op: bool = False  # runs an op with the base weight (else it adds delta-only terms)

    def __init__(self, tasks: list[int], total: int):
        self.tasks = tasks
        self.lookup = torch.full((total,), -1, dtype=torch.int64)
        self.lookup[tasks] = torch.arange(len(tasks))

    def local(
        self, ids: Tensor | None, coeffs: Tensor | None, memo: Memo = _no_memo
    ) -> tuple[Tensor | None, Tensor | None]:
        """The route in this bank's task numbering."""
        n = (ids if ids is not None else coeffs).shape[0]
        return memo(("local", tuple(self.tasks), n), lambda: self._local(ids, coeffs))

    def _local(
        self, ids: Tensor | None, coeffs: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if ids is not None:
            return torch.where(ids >= 0, self.lookup[ids.clamp_min(0)], -1).contiguous(), None
        assert coeffs is not None
        return None, coeffs[:, self.tasks].contiguous()

    def delta(self, b: int) -> Tensor:
        """Bank task b's residual as an fp32 [out, in] matrix."""
        raise NotImplementedError

    def delta_rows(self, b: int, idx: Tensor) -> Tensor:
        """Rows `idx` of bank task b's residual, fp32 [len(idx), in]."""
        raise NotImplementedError

    def merged(self, w: Tensor, alphas: Tensor) -> Tensor:
        """w + sum_t alphas[t] tau_t (fp32 sum, one rounding to w's dtype)."""
        acc = None
        for b, t in enumerate(self.tasks):
            if float(alphas[t]):
                term = float(alphas[t]) * self.delta(b)
                acc = term if acc is None else acc + term
        return w if acc is None else (w.float() + acc).to(w.dtype)

    def gather(self, out: Tensor, idx: Tensor, c: Tensor) -> None:
        """out[n] += sum_t c[n, t] tau_t[idx[n]] (embedding lookups)."""
        for b, t in enumerate(self.tasks):
            rows = (c[:, t] != 0).nonzero().flatten()
            if rows.numel():
                _add_rows(out, rows, c[rows, t], self.delta_rows(b, idx[rows]))

    def uses(self, ids: Tensor | None, coeffs: Tensor | None, memo: Memo = _no_memo) -> bool:
        n = (ids if ids is not None else coeffs).shape[0]
        return memo(("uses", tuple(self.tasks), n), lambda: self._uses(ids, coeffs))

    def _uses(self, ids: Tensor | None, coeffs: Tensor | None) -> bool:
        if ids is not None:
            return bool((self.lookup[ids.clamp_min(0)][ids >= 0] >= 0).any())
        assert coeffs is not None
        return bool(coeffs[:, self.tasks].any())


class SignBank(_Bank):
    fused_op = True

    def __init__(
        self,
        tasks: list[int],
        total: int,
        forms: list[SignForm],
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(tasks, total)
        out, self.cols = shape
        rows = out if any(f.scales.shape[0] > 1 for f in forms) else 1
        self.packed = torch.stack([f.packed for f in forms]).to(device).contiguous()
        self.scales = (
            torch.stack([f.scales.float().expand(rows, -1) for f in forms]).to(device).contiguous()
        )

    def fused(
        self, x: Tensor, w0: Tensor, b0: Tensor | None, ids, coeffs, memo: Memo = _no_memo
    ) -> Tensor:
        i, c = self.local(ids, coeffs, memo)
        return ops.sign_linear(x, w0, self.packed, self.scales, i, c, b0)

    def delta(self, b: int) -> Tensor:
        return self.delta_rows(b, None)

    def delta_rows(self, b: int, rows: Tensor | None) -> Tensor:
        packed = self.packed[b] if rows is None else self.packed[b][rows]
        scales = self.scales[b]
        if rows is not None and scales.shape[0] > 1:
            scales = scales[rows]
        signs = ops.unpack_signs(packed.contiguous(), self.cols, torch.float32)
        if scales.shape[1] == 1:  # one scale per row (or tensor): broadcast, no [n, in] copy
            return signs * scales
        return signs * expand_scales(scales[None], signs.shape[0], self.cols)[0]

    def add_delta(self, y: Tensor, x: Tensor, ids, coeffs) -> None:
        for b, _, rows, c in _terms(self.tasks, ids, coeffs):
            _add_rows(y, rows, c, x[rows] @ self.delta(b).to(x.dtype).T)

    def merged(self, w: Tensor, alphas: Tensor) -> Tensor:
        a = alphas[self.tasks]
        sel = a.nonzero().flatten()
        if not sel.numel():
            return w
        if sel.numel() == len(self.tasks):
            return ops.dequant_add_sign(w, self.packed, self.scales, a.float())
        return ops.dequant_add_sign(
            w, self.packed[sel].contiguous(), self.scales[sel].contiguous(), a[sel].float()
        )

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 4


class LowRankBank(_Bank):
    fused_op = True

    def __init__(
        self,
        tasks: list[int],
        total: int,
        forms: list[LowRankForm],
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(tasks, total)
        r = max(f.U.shape[1] for f in forms)
        self.U = (
            torch.stack([F.pad(f.U.float(), (0, r - f.U.shape[1])) for f in forms])
            .to(device, dtype)
            .contiguous()
        )
        self.V = (
            torch.stack([F.pad(f.V.float(), (0, 0, 0, r - f.V.shape[0])) for f in forms])
            .to(device, dtype)
            .contiguous()
        )

    def fused(
        self, x: Tensor, w0: Tensor, b0: Tensor | None, ids, coeffs, memo: Memo = _no_memo
    ) -> Tensor:
        i, c = self.local(ids, coeffs, memo)
        return ops.lowrank_linear(x, w0, self.U, self.V, i, c, b0)

    def add_delta(self, y: Tensor, x: Tensor, ids, coeffs) -> None:
        for b, _, rows, c in _terms(self.tasks, ids, coeffs):
            z = x[rows].float() @ self.V[b].float().T
            _add_rows(y, rows, c, z @ self.U[b].float().T)

    def delta(self, b: int) -> Tensor:
        return self.U[b].float() @ self.V[b].float()

    def delta_rows(self, b: int, idx: Tensor) -> Tensor:
        return self.U[b][idx].float() @ self.V[b].float()

    def nbytes(self) -> int:
        return self.U.numel() * self.U.element_size() + self.V.numel() * self.V.element_size()


class DenseBank(_Bank):
    def __init__(
        self,
        tasks: list[int],
        total: int,
        forms: list[DenseForm],
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(tasks, total)
        self.D = (
            torch.stack([f.delta.float().reshape(shape) for f in forms])
            .to(device, dtype)
            .contiguous()
        )

    def add_delta(self, y: Tensor, x: Tensor, ids, coeffs) -> None:
        for b, _, rows, c in _terms(self.tasks, ids, coeffs):
            _add_rows(y, rows, c, x[rows].float() @ self.D[b].float().T)

    def delta(self, b: int) -> Tensor:
        return self.D[b].float()

    def delta_rows(self, b: int, idx: Tensor) -> Tensor:
        return self.D[b][idx].float()

    def nbytes(self) -> int:
        return self.D.numel() * self.D.element_size()


# Which bank stacks which runtime form, in the order they apply: the first bank some row
# uses runs its op with the base weight (sign, else low rank); the others add delta-only terms.
BANKS: dict[type, type[_Bank]] = {
    SignForm: SignBank,
    LowRankForm: LowRankBank,
    DenseForm: DenseBank,
}


class WeightBank:
    """All tasks' residuals of one 2-D base weight [out, in] (see the module docstring)."""

    def __init__(
        self,
        residuals: Sequence[Residual],
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ):
        total = len(residuals)
        self.shape = shape
        groups: dict[Hashable, list[tuple[int, Form]]] = {}
        for t, r in enumerate(residuals):
            form = r.runtime_form()
            if form is not None:
                groups.setdefault(form.stack_key(), []).append((t, form))
        order = list(BANKS)
        keys = sorted(groups, key=lambda k: order.index(type(groups[k][0][1])))
        self.banks: list[_Bank] = [
            BANKS[type(groups[k][0][1])](
                [t for t, _ in groups[k]], total, [f for _, f in groups[k]], shape, dtype, device
            )
            for k in keys
        ]

    def __bool__(self) -> bool:
        return bool(self.banks)

    def fused(
        self,
        x: Tensor,
        w0: Tensor | None,
        b0: Tensor | None,
        ids,
        coeffs,
        base_out: Tensor | None = None,
        memo: Memo = _no_memo,
    ) -> Tensor:
        """[n, out] = x W0^T + b0 + each row's task terms. With `base_out` (a base layer that
        is not a plain matrix, e.g. bitsandbytes), every bank adds delta-only terms to it.
        `memo` caches route-derived index tensors across the layers of one call."""
        rest = self.banks
        first = self.banks[0] if self.banks else None
        if base_out is not None:
            y = base_out
        elif first is not None and first.fused_op and first.uses(ids, coeffs, memo):
            assert w0 is not None
            y = first.fused(x, w0, b0, ids, coeffs, memo)
            rest = self.banks[1:]
        else:
            assert w0 is not None
            y = F.linear(x, w0, b0)
        for bank in rest:
            if bank.uses(ids, coeffs, memo):
                bank.add_delta(y, x, ids, coeffs)
        return y

    def merged(self, w0: Tensor, alphas: Tensor) -> Tensor:
        w = w0
        for bank in self.banks:
            w = bank.merged(w, alphas)
        return w.clone() if w is w0 else w

    def gather(self, idx: Tensor, c: Tensor, dtype: torch.dtype) -> Tensor:
        """[n, in]: sum_t c[n, t] * tau_t[idx[n]]."""
        out = torch.zeros(idx.shape[0], self.shape[1], dtype=torch.float32, device=idx.device)
        for bank in self.banks:
            bank.gather(out, idx, c)
        return out.to(dtype)

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.banks)
