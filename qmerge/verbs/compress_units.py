"""`compress` and `add_task` on an executor (verbs/executor.py): the units of work, what a
worker does with one, and how the coordinator gets each task's tensors back.

A unit is a group of base tensors (never across the base's shard files, about `UNIT_BYTES` of
the base each) for every task, so a worker reads the base's part once and each fine-tune's
matching part once. It encodes them exactly as the one-process path does (`encode_tensor`),
writes one fragment per task into the transaction's scratch directory and returns only the
fragments' sizes and hashes and the codec entries. A byte budget (`lowrank:budget_bits`) spans
a task's tensors: a first pass of units returns each tensor's `plan_item` (its spectrum), the
coordinator runs `plan_from` over them in the one-process order, and the second pass encodes.
The coordinator checks every fragment, maps them back into one table of parts per task and
hands that to the pack writer, so the task file has the bytes the one-process path writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qmerge.codecs import CODECS, codec
from qmerge.codecs.encode import threads_matter
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.writer import Fragment, open_fragment, write_fragment
from qmerge.verbs.executor import Inline, failpoint
from qmerge.verbs.progress import bar
from qmerge.verbs.tensors import (
    Options,
    delta,
    encode_rows,
    encode_tensor,
    join_rows,
    plan,
    plan_groups,
    release_freed_memory,
    specs,
)

UNIT_BYTES = 48 << 20  # of the base per unit: enough units to keep workers busy and balanced
SLICE_BYTES = 16 << 20  # of the base per slice of a cut tensor: a slice holds ~2.5x its delta


@dataclass(frozen=True)
class Unit:
    """Some tensors of the base, for every task (plain data: it travels to a worker)."""

    index: int
    base: str
    tasks: tuple[tuple[str, str], ...]  # (task, fine-tune path)
    names: tuple[str, ...]
    opts: Options  # without calibration inputs: `calib` holds this unit's rows
    calib: Mapping[str, Mapping[str, Tensor]]  # task -> tensor -> calibration rows
    planned: Mapping[str, Mapping[str, dict | None]]  # task -> tensor -> budget keywords
    scratch: str
    items_only: bool = False  # the planning pass: return plan items, encode nothing
    nbytes: int = 0  # of the base (the largest units are sent first)
    threads: int = 1  # intra-op threads (the planner's where a codec's bytes depend on it)
    rows: tuple[int, int] | None = None  # a slice of rows of the one tensor in `names`


def partition(
    base: Checkpoint, names: list[str], target: int | None = None, splittable=lambda n: False
) -> list[tuple[list[str], tuple[int, int] | None]]:
    """Groups of `names` (sorted) that stay within one shard file, cut at `target` bytes
    (default `UNIT_BYTES`); a tensor larger than that for which `splittable(name)` holds (a
    large embedding under a row-wise codec) becomes slices of rows, one unit each."""
    target = UNIT_BYTES if target is None else target
    by_file: dict[object, list[str]] = {}
    for n in sorted(names):
        by_file.setdefault(base.file_of(n), []).append(n)
    groups: list[tuple[list[str], tuple[int, int] | None]] = []
    for members in by_file.values():
        group: list[str] = []
        size = 0
        for n in members:
            nbytes = _nbytes(base, n)
            if nbytes > target and len(base.shape(n)) >= 2 and splittable(n):
                rows = base.shape(n)[0]
                step = max(1, rows * min(target, SLICE_BYTES) // nbytes)
                groups += [([n], (a, min(rows, a + step))) for a in range(0, rows, step)]
                continue
            if group and size + nbytes > target:
                groups.append((group, None))
                group, size = [], 0
            group.append(n)
            size += nbytes
        if group:
            groups.append((group, None))
    return groups


def _nbytes(ckpt: Checkpoint, n: str) -> int:
    count = 1
    for d in ckpt.shape(n):
        count *= d
    return count * ckpt.dtype(n).itemsize


def run(unit: Unit) -> dict:
    """A worker's part: encode (or, with `items_only`, plan) the unit's tensors of every task."""
    base = Checkpoint(unit.base)
    fts = {t: Checkpoint(p) for t, p in unit.tasks}
    rows = {t: plan(base, ft, unit.opts) for t, ft in fts.items()}
    if unit.items_only:
        return _items(unit, base, fts, rows)
    parts: dict[str, dict[str, Tensor]] = {t: {} for t in fts}
    tables: dict[str, dict[str, dict]] = {t: {} for t in fts}
    slices: dict[str, dict[str, tuple[int, dict]]] = {t: {} for t in fts}
    for n in unit.names:
        for t, ft in fts.items():
            if n not in rows[t]:
                continue
            spec = specs(t, base, unit.opts, [n])[n]
            if unit.rows is not None:
                stored, figures = encode_rows(n, base, ft, spec, unit.rows, unit.opts.lossless)
                slices[t][n] = (unit.rows[0], figures)
            else:
                stored, tables[t][n] = encode_tensor(
                    n,
                    base,
                    ft,
                    spec,
                    rows[t][n],
                    unit.opts.policy.skip_below,
                    unit.calib.get(t, {}).get(n),
                    unit.planned.get(t),
                    unit.opts.lossless,
                )
            parts[t].update(stored)
            del stored
            release_freed_memory()  # as the one-process path: after each task's tensor
    fragments: dict[str, Fragment] = {}
    for t in fts:
        fragments[t] = write_fragment(unit.scratch, f"{t}/{unit.index:06d}.safetensors", parts[t])
        failpoint(unit.index)  # (a test's worker dies here, one task written)
    return {"fragments": fragments, "tables": tables, "slices": slices}


def _splittable(base: Checkpoint, extra: Mapping[str, dict[str, int]], opts: Options):
    """Whether a tensor may be cut into slices of rows: every task encodes it whole with a
    row-wise codec (`Residual.rows_independent`), without grown rows, calibration or a plan.
    `extra`: each task's `plan` (tensor -> grown rows)."""
    fts = list(extra)

    def ok(n: str) -> bool:
        for t in fts:
            if extra[t].get(n, 0) or n in opts.calib_inputs.get(t, opts.calib or {}):
                return False
            _, choice = specs(t, base, opts, [n])[n]
            if choice.name not in CODECS or not codec(choice.name).residual.rows_independent(
                choice.config
            ):
                return False
        return True

    return ok


def _items(unit: Unit, base: Checkpoint, fts: dict[str, Checkpoint], rows) -> dict:
    out: dict[str, dict[str, object]] = {t: {} for t in fts}
    for t, ft in fts.items():
        spec = specs(t, base, unit.opts, [n for n in unit.names if n in rows[t]])
        for choice, names in plan_groups(spec).items():
            residual = codec(choice.name).residual
            for n in names:
                out[t][n] = residual.plan_item(choice.config, delta(base, ft, n, rows[t][n]))
                release_freed_memory()
    return {"items": out}


def _bar(label: str, show: bool, units: list[Unit]):
    return lambda it: bar(it, show, label, total=len(units), unit="unit")


def _budget_plans(
    executor: Inline, template: Unit, groups: list[list[str]], base: Checkpoint, extra, show: bool
) -> dict[str, dict[str, dict | None]]:
    """Pass 1 for codecs whose config spans tensors: every tensor's plan item from the
    workers, then each task's plan over them in the one-process order. `extra`: each task's
    `plan` (tensor -> grown rows)."""
    planned: dict[str, dict[str, dict | None]] = {t: {} for t in extra}
    need = {t: plan_groups(specs(t, base, template.opts, rows)) for t, rows in extra.items()}
    wanted = {n for g in need.values() for names in g.values() for n in names}
    if not wanted:
        return planned
    threads = torch.get_num_threads()  # spectra are SVDs: their bytes depend on it
    units = [
        dataclasses.replace(
            template,
            index=i,
            names=tuple(n for n in g if n in wanted),
            items_only=True,
            threads=threads,
        )
        for i, g in enumerate(groups)
        if any(n in wanted for n in g)
    ]
    results = executor.map(run, units, Path(template.scratch), _bar("plan budgets", show, units))
    items: dict[str, dict[str, object]] = {t: {} for t in extra}
    for r in results:
        for t, got in r["items"].items():
            items[t].update(got)
    for t, groups_of_t in need.items():
        for choice, names in groups_of_t.items():
            residual = codec(choice.name).residual
            planned[t].update(residual.plan_from(choice.config, [(n, items[t][n]) for n in names]))
    return planned


def _threads(names: list[str], base: Checkpoint, fts, opts: Options) -> int:
    """1, or this process's intra-op thread count if some tensor's codec depends on it."""
    choices = {c for t in fts for _, c in specs(t, base, opts, names).values()}
    return torch.get_num_threads() if any(threads_matter(c) for c in choices) else 1


def encode_all(
    executor: Inline, base: Checkpoint, fts: Mapping[str, Checkpoint], opts: Options, scratch: Path
) -> dict[str, tuple[dict[str, Tensor], dict[str, dict]]]:
    """Every task's (parts, codec table), as `encode_task` gives them, from units run on
    `executor`; the parts are views of the checked fragment files under `scratch`."""
    extra = {t: plan(base, ft, opts) for t, ft in fts.items()}  # checked once, here
    names = sorted({n for rows in extra.values() for n in rows})
    groups = partition(base, names, splittable=_splittable(base, extra, opts))
    calib_of = {t: opts.calib_inputs.get(t, opts.calib or {}) for t in fts}
    light = dataclasses.replace(opts, calib=None, calib_inputs={}, calib_texts=None, progress=False)
    template = Unit(
        0,
        str(base.path),
        tuple((t, str(ft.path)) for t, ft in fts.items()),
        (),
        light,
        {},
        {},
        str(scratch),
    )
    whole = [g for g, r in groups if r is None]  # (a planned tensor is never cut)
    planned = _budget_plans(executor, template, whole, base, extra, opts.progress)
    units = [
        dataclasses.replace(
            template,
            index=i,
            names=tuple(g),
            calib={t: {n: c[n] for n in g if n in c} for t, c in calib_of.items()},
            planned={t: {n: p[n] for n in g if n in p} for t, p in planned.items()},
            nbytes=_unit_bytes(base, g, r),
            rows=r,
            threads=_threads(g, base, fts, opts),
        )
        for i, (g, r) in enumerate(groups)
    ]
    order = sorted(units, key=lambda u: -u.nbytes)  # largest first: the last to finish is small
    done = executor.map(run, order, scratch, _bar("compress", opts.progress, order))
    results = sorted(zip((u.index for u in order), done, strict=True))
    return {t: _gather(t, base, ft, opts, results, scratch) for t, ft in fts.items()}


def _unit_bytes(base: Checkpoint, names: list[str], rows: tuple[int, int] | None) -> int:
    if rows is None:
        return sum(_nbytes(base, n) for n in names)
    return _nbytes(base, names[0]) * (rows[1] - rows[0]) // base.shape(names[0])[0]


def _gather(
    t: str, base: Checkpoint, ft: Checkpoint, opts: Options, results: list, scratch: Path
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """One task's parts (views of its checked fragments) and codec table, slices joined."""
    parts: dict[str, Tensor] = {}
    table: dict[str, dict] = {}
    pieces: dict[str, list] = {}
    for _, r in results:
        f = open_fragment(scratch, r["fragments"][t])
        views = {k: f.get(k) for k in f.keys()}
        if r["slices"][t]:
            [(n, (start, figures))] = r["slices"][t].items()
            pieces.setdefault(n, []).append((start, views, figures))
        else:
            parts.update(views)
            table.update(r["tables"][t])
    for n, got in pieces.items():
        spec = specs(t, base, opts, [n])[n]
        stored, table[n] = join_rows(n, base, ft, spec, got, opts.policy.skip_below)
        parts.update(stored)
    return parts, dict(sorted(table.items()))
