"""Compressing fine-tunes into a pack: `compress`, `add_task`, `remove_task`.

Every input is opened and checked against the base before any tensor is encoded (tensors.py
walks one fine-tune at a time); the pack changes only through the pack writer
(format/writer.py), so a mismatch, a NaN/Inf delta or any other fault leaves the pack as it
was: a new pack is built in a hidden sibling directory and swapped in at the end, a task is
added by writing its file, then the manifest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from qmerge.errors import ConfigError, PackError
from qmerge.format import manifest as mf
from qmerge.format.adapter import is_adapter
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.fingerprint import checkpoint_fingerprint
from qmerge.format.pack import Pack
from qmerge.format.writer import PackWriter
from qmerge.verbs.adapter_task import AdapterTask, encode_adapter, open_adapter
from qmerge.verbs.adapter_task import summary as adapter_summary
from qmerge.verbs.executor import Inline, resolve
from qmerge.verbs.progress import bar
from qmerge.verbs.tensors import (
    Options,
    encode_heads,
    encode_task,
    labels,
    plan,
    release_freed_memory,
)

PathLike = str | os.PathLike
__all__ = ["Options", "add_task", "compress", "remove_task"]


def _open_inputs(
    base: PathLike, tasks: Mapping[str, PathLike], opts: Options
) -> tuple[Checkpoint, dict[str, Checkpoint | AdapterTask]]:
    """Opens and checks every input before any work, so a bad one costs nothing. A task
    directory with adapter_config.json is a PEFT LoRA adapter (verbs/adapter_task.py)."""
    if not tasks:
        raise PackError("no tasks given: pass at least one NAME=DIR")
    for name in tasks:
        mf.check_new_task_name(name)
    _check_distill(tasks, opts)
    base_ckpt = Checkpoint(base)
    fts: dict[str, Checkpoint | AdapterTask] = {}
    for name, path in tasks.items():
        if is_adapter(path):
            if opts.calib_texts or opts.calib:
                raise ConfigError(f"task {name!r} is a LoRA adapter: it takes no calibration")
            fts[name] = open_adapter(path, base_ckpt, opts)
        else:
            fts[name] = ft = Checkpoint(path)
            plan(base_ckpt, ft, opts)
    return base_ckpt, fts


def _calibrated(base: PathLike, tasks: Mapping[str, PathLike], opts: Options) -> Options:
    """`opts` with the layer inputs of its calibration texts, per task (after every input was
    checked: a bad fine-tune costs no forward passes)."""
    if not opts.calib_texts:
        return opts
    from qmerge.verbs import calibrate

    inputs = calibrate.per_task(
        base,
        opts.calib_texts,
        tasks,
        opts.calib_from,
        max_rows=opts.calib_rows,
        max_length=opts.calib_max_length,
        progress=lambda it: bar(it, opts.progress, "calibrate", unit="batch"),
    )
    return dataclasses.replace(opts, calib_inputs=inputs)


def _check_distill(tasks: Mapping[str, PathLike], opts: Options) -> None:
    if opts.distill_steps < 0:
        raise ConfigError(f"distill_steps must be >= 0, got {opts.distill_steps}")
    if opts.distill_steps and not opts.calib_texts:
        raise ConfigError("scale distillation (--distill-steps) needs --calib-texts")
    if opts.distill_steps and "*" not in opts.calib_texts:
        if missing := [t for t in tasks if t not in opts.calib_texts]:
            raise ConfigError(f"scale distillation needs calibration texts for task {missing[0]!r}")


def _distill(name: str, base: Checkpoint, ft: Checkpoint, parts, table, opts: Options) -> None:
    from qmerge.verbs import calibrate, distill

    src = opts.calib_texts.get(name, opts.calib_texts.get("*"))
    distill.distill_task(
        base.path,
        ft.path,
        parts,
        table,
        calibrate.texts_of(src),
        steps=opts.distill_steps,
        lr=opts.distill_lr,
        max_length=opts.calib_max_length,
        progress=lambda it: bar(it, opts.progress, f"{name}: distill scales", unit="step"),
    )


def _fingerprint(base: Checkpoint, opts: Options) -> dict:
    return checkpoint_fingerprint(base, lambda it: bar(it, opts.progress, "fingerprint base"))


def _put_task(
    w: PackWriter,
    name: str,
    base: Checkpoint,
    ft: Checkpoint | AdapterTask,
    opts: Options,
    encoded: tuple[dict, dict] | None = None,
) -> None:
    """Encodes a task (or takes what units encoded) and writes it whole through the writer."""
    extra: dict = {}
    if isinstance(ft, AdapterTask):
        parts, table, head_parts, head_table = encode_adapter(name, base, ft, opts)
        extra["adapter"] = adapter_summary(ft)
    else:
        parts, table = encoded if encoded is not None else encode_task(name, base, ft, opts)
        if opts.distill_steps:
            _distill(name, base, ft, parts, table, opts)
        head_parts, head_table = encode_heads(base, ft, opts)
    parts.update(head_parts)
    entry: dict = {"source": str(ft.path), "tensors": table} | extra
    if head_table:
        entry["heads"] = head_table
    if (names := labels(ft)) is not None:
        entry["labels"] = names
    w.put_task(name, parts, entry)
    del parts
    release_freed_memory()


def _put_tasks(
    w: PackWriter,
    base: Checkpoint,
    fts: dict[str, Checkpoint | AdapterTask],
    opts: Options,
    run: Inline | None,
) -> None:
    """Every task into the pack: one after another here, or encoded by units on `run` (the
    bytes are the same; see compress_units.py) and then written whole, in the same order."""
    if run is None:
        for name, ft in fts.items():
            _put_task(w, name, base, ft, opts)
        return
    from qmerge.verbs import compress_units

    full = {n: ft for n, ft in fts.items() if isinstance(ft, Checkpoint)}  # adapters: here
    with w.fragments() as scratch:
        encoded = compress_units.encode_all(run, base, full, opts, scratch) if full else {}
        for name, ft in fts.items():
            _put_task(w, name, base, ft, opts, encoded.pop(name, None))


def compress(
    base: PathLike,
    tasks: Mapping[str, PathLike],
    out: PathLike,
    *,
    opts: Options | None = None,
    overwrite: bool = False,
    executor: str | Inline | None = None,
) -> Pack:
    """Compresses fine-tunes of `base` into a new pack at `out`.

    Args:
        base: the base checkpoint (file or Hugging Face directory).
        tasks: task name -> fine-tuned checkpoint.
        out: the pack directory to create. An existing pack is replaced only with
            `overwrite=True`, atomically: until the new pack is complete the old one stays.
        opts: codec policy and input handling (`Options`).
        executor: "local" (default: this process, one task at a time), "ray" (units of
            tensors on a local Ray; `executor.Ray(address=...)` joins a cluster), or an
            executor object. The pack's bytes are the same whichever runs.

    Returns:
        The new pack, opened.
    """
    opts = opts or Options()
    out = Path(out)
    if out.exists() and (out / mf.NAME).is_file() and not overwrite:
        raise PackError(
            f"{out}: a pack already exists; pass --overwrite to replace it, or use add-task"
        )
    run = resolve(executor)
    if run is not None:
        run.start()
    base_ckpt, fts = _open_inputs(base, tasks, opts)
    opts = _calibrated(base, tasks, opts)
    with PackWriter.create(out, _fingerprint(base_ckpt, opts), overwrite=overwrite) as w:
        _put_tasks(w, base_ckpt, fts, opts, run)
    return Pack.open(out)


def add_task(
    pack: PathLike,
    base: PathLike,
    tasks: Mapping[str, PathLike],
    *,
    opts: Options | None = None,
    executor: str | Inline | None = None,
) -> Pack:
    """Adds tasks to an existing pack without rewriting the others. The base must be the
    pack's (checked by fingerprint); a task name already in the pack is refused. `executor`
    as in `compress`."""
    opts = opts or Options()
    path = Path(pack)
    Pack.open(path)  # a clear error if it is not a pack
    run = resolve(executor)
    if run is not None:
        run.start()
    base_ckpt, fts = _open_inputs(base, tasks, opts)
    opts = _calibrated(base, tasks, opts)
    fp = _fingerprint(base_ckpt, opts)
    with PackWriter.edit(path) as w:
        Pack(path, w.manifest).check_base(fp, f"{path}: cannot add to this pack")
        if clash := sorted(set(tasks) & set(w.manifest["tasks"])):
            raise PackError(f"{path}: already has task {clash[0]!r}; remove-task it first")
        _put_tasks(w, base_ckpt, fts, opts, run)
    return Pack.open(path)


def remove_task(pack: PathLike, names: Iterable[str]) -> Pack:
    """Removes tasks from a pack: the manifest first (atomically), then their files."""
    path = Path(pack)
    with PackWriter.edit(path) as w:
        for name in names:
            w.remove_task(name)
    return Pack.open(path)
