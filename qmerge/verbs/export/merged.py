"""Merged weights, one tensor at a time: W = W0 + sum_t c_t * dequant(tau_t), summed in fp32
in task order (the semantics of `dequant_add_sign` and of the routed model), read from the
memory-mapped base and pack so memory holds one tensor, whatever the number of tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from qmerge.codecs import CODECS, Residual
from qmerge.errors import ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.pack import Pack
from qmerge.verbs.export.selection import Selection
from qmerge.verbs.packs import residual, shared_residual


def residuals(pack: Pack, sel: Selection, name: str) -> list[tuple[float, Residual]]:
    """(coefficient, residual) of every selected task that changes base tensor `name`."""
    out = []
    for t, c in sel.coeffs.items():
        entry = pack.entries(t).get(name)
        kind = CODECS.get(entry["codec"]) if entry is not None else None
        if entry is None or (kind is not None and kind.residual.is_zero):
            continue
        if entry.get("extra_rows", 0):
            raise ConfigError(
                f"{pack.path}: task {t!r} grows '{name}' by {entry['extra_rows']} "
                f"rows; exporting a resized vocabulary is not supported"
            )
        out.append((c, residual(pack, t, name)))
    return out


def delta(pack: Pack, sel: Selection, name: str, shape: tuple[int, ...]) -> Tensor | None:
    """[shared +] sum_t c_t * dequant(tau_t) in fp32 (a merged pack's shared delta first, as
    the routed model's backbone has it), or None where nothing selected changes `name`."""
    acc = None
    if name in pack.shared_entries():
        acc = shared_residual(pack, name).dequantize(torch.float32).reshape(shape).clone()
    for c, r in residuals(pack, sel, name):
        # dequantize may return the stored (memory-mapped) tensor itself, e.g. a dense fp32
        # residual: never write into it; the first product is a fresh tensor
        d = r.dequantize(torch.float32).reshape(shape)
        acc = d * c if acc is None else acc.add_(d, alpha=c)
    return acc


def merged(pack: Pack, base: Checkpoint, sel: Selection, name: str) -> Tensor:
    """The merged tensor in fp32 (integer buffers as they are in the base)."""
    w = base.get(name)
    if not w.is_floating_point():
        return w.clone()
    d = delta(pack, sel, name, tuple(w.shape))
    return w.float() if d is None else d.add_(w.float())


def energy(pack: Pack, sel: Selection, name: str, shape: tuple[int, ...]) -> float:
    """Squared Frobenius norm of the selection's delta of `name` (what an export that leaves
    the tensor out loses of the task vector)."""
    d = delta(pack, sel, name, shape)
    return 0.0 if d is None else float(d.double().pow(2).sum())
