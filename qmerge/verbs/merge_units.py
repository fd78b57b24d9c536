"""`merge` on an executor (verbs/executor.py): the pack's tensors in groups, each merged and
encoded by a worker exactly as the one-process path does it (`merge._merged_tensor`,
`merge._encode_tensor`), written as fragments (the shared delta's and each task's exclusive
parts) and gathered back into one `_Out` by the coordinator, which writes the new pack.

A merge is per tensor: every method's result for one tensor depends only on the tasks' deltas
of that tensor and its context (DARE's drop is seeded from the merge's seed and the tensor's
name), so groups can run anywhere in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qmerge.codecs.base import CodecChoice
from qmerge.codecs.policy import Policy
from qmerge.format.pack import Pack
from qmerge.format.writer import Fragment, open_fragment, write_fragment
from qmerge.merge.base import MethodChoice
from qmerge.verbs.executor import Inline, failpoint

SHARED = "_shared"  # the fragment directory of the shared delta (not a task name: '_' first)
UNIT_BYTES = 32 << 20  # of fp32 per task in a group


@dataclass(frozen=True)
class Unit:
    index: int
    pack: str
    names: tuple[str, ...]
    choice: MethodChoice
    shared_codec: CodecChoice
    policy: Policy
    scratch: str
    threads: int = 1  # the coordinator's: merge methods' sums and SVDs depend on it
    base: str | None = None  # the base checkpoint, for a method that reads it


def run(unit: Unit) -> dict:
    """A worker's part: merge and encode the unit's tensors; their parts as fragments."""
    from qmerge.verbs import merge

    src = Pack.open(unit.pack)
    acc = merge._Out(tuple(src.tasks))
    ctx = merge._contexts(src, unit.base)
    for n in unit.names:
        deltas, result = merge._merged_tensor(src, unit.choice, n, ctx)
        merge._encode_tensor(
            acc,
            n,
            merge._shape(src, n),
            src.base_fingerprint["tensors"][n]["dtype"],
            deltas,
            result,
            unit.shared_codec,
            unit.policy,
        )
        del deltas, result
    frags: dict[str, Fragment] = {}
    for key, parts in [(SHARED, acc.shared_parts), *acc.parts.items()]:
        frags[key] = write_fragment(unit.scratch, f"{key}/{unit.index:06d}.safetensors", parts)
        failpoint(unit.index)
    return {"fragments": frags, "shared": acc.shared_table, "tables": acc.tables}


def merged(
    executor: Inline,
    src: Pack,
    names: list[str],
    choice: MethodChoice,
    shared_codec: CodecChoice,
    policy: Policy,
    scratch: Path,
    progress: Callable,
    base: str | None = None,
):
    """The `_Out` of the whole merge, from units on `executor`; its parts are views of the
    checked fragments under `scratch`."""
    groups: list[list[str]] = []
    size = 0
    per = 4 * max(1, len(src.tasks))
    for n in names:
        nbytes = per * int(torch.Size(src.base_fingerprint["tensors"][n]["shape"]).numel())
        if not groups or size + nbytes > UNIT_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    threads = torch.get_num_threads()  # methods' sums and SVDs: their bytes depend on it
    template = Unit(0, str(src.path), (), choice, shared_codec, policy, str(scratch), threads, base)
    units = [replace(template, index=i, names=tuple(g)) for i, g in enumerate(groups)]
    results = executor.map(run, units, scratch, progress)
    from qmerge.verbs import merge

    acc = merge._Out(tuple(src.tasks))
    for r in results:
        acc.shared_table.update(r["shared"])
        for key, frag in r["fragments"].items():
            f = open_fragment(scratch, frag)
            views = {k: f.get(k) for k in f.keys()}
            (acc.shared_parts if key == SHARED else acc.parts.setdefault(key, {})).update(views)
        for t, table in r["tables"].items():
            acc.tables.setdefault(t, {}).update(table)
    return acc
