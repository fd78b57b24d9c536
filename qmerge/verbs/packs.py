"""Reading packs at the model level: residuals, `verify` and `inspect`."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from qmerge.codecs import CODECS, Residual, load_residual
from qmerge.codecs.policy import MODULE_TYPES
from qmerge.errors import PackError
from qmerge.format import manifest as mf
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.fingerprint import checkpoint_fingerprint
from qmerge.format.pack import PART_SEP, Pack

PathLike = str | os.PathLike


def open_pack(path: PathLike, base: PathLike | None = None, verify_files: bool = True) -> Pack:
    """Opens a pack lazily (the manifest only). With `base`, refuses it unless the pack was
    made from that base (BaseMismatchError naming the first differing tensor)."""
    pack = Pack.open(path, verify_files=verify_files)
    if base is not None:
        pack.check_base(checkpoint_fingerprint(Checkpoint(base)), f"{path}")
    return pack


def residual(pack: Pack, task: str, tensor: str) -> Residual:
    """One task's residual of one base tensor, over the memory-mapped file. In a merged pack
    it is the task's exclusive part, over a backbone that has the shared delta."""
    entry = pack.entries(task).get(tensor)
    if entry is None:
        raise PackError(f"{pack.path}: task {task!r} has no tensor '{tensor}'")
    parts = pack.parts(task, tensor)
    parts.pop("extra_rows", None)
    c = CODECS.get(entry["codec"])  # an unknown codec is reported by load_residual
    if c is not None and c.residual.needs_shared:  # e.g. a mask over it (codecs/mask.py)
        if tensor not in pack.shared_entries():
            raise PackError(
                f"{pack.path}: task {task!r} tensor '{tensor}' is a mask over the "
                f"shared delta, which has no such tensor"
            )
        parts["unified"] = shared_residual(pack, tensor).dequantize(torch.float32)
    return load_residual(entry, parts, f"{pack.path}: task {task!r} tensor '{tensor}'")


def shared_residual(pack: Pack, tensor: str) -> Residual:
    """The shared delta of one base tensor (a merged pack's), over the memory-mapped file."""
    entry = pack.shared_entries().get(tensor)
    if entry is None:
        raise PackError(f"{pack.path}: the shared delta has no tensor '{tensor}'")
    c = CODECS.get(entry["codec"])
    if c is not None and c.residual.needs_shared:
        raise PackError(
            f"{pack.path}: shared delta tensor '{tensor}': codec "
            f"{entry['codec']!r} cannot hold a shared delta"
        )
    return load_residual(
        entry, pack.shared_parts(tensor), f"{pack.path}: shared delta tensor '{tensor}'"
    )


def _check_finite(parts: dict, where: str) -> None:
    """A stored part with NaN or inf (a scale, a factor) would make every answer NaN."""
    for key, t in parts.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackError(f"{where}: part '{key}' holds NaN or inf")


def verify(path: PathLike, base: PathLike | None = None, progress=lambda it: it) -> dict:
    """Checks a pack completely: every file's size and sha256, that every task file holds
    exactly the residuals its table names and each one reads back, and (with `base`) the base
    fingerprint. Raises the PackError subclass of the first fault; returns a report."""
    pack = Pack.open(path)
    checked = 0
    for rel in progress(sorted(pack.manifest["files"])):
        pack.check_file(rel)
        checked += 1
    for task in pack.tasks:
        f = pack.task_file(task)
        table = pack.entries(task)
        heads = pack.manifest["tasks"][task].get("heads", {})
        pack.heads(task)
        for key in f.keys():
            tensor = key.partition(PART_SEP)[0]
            if tensor not in table and tensor not in heads:
                raise PackError(
                    f"{f.path}: holds '{key}', which task {task!r}'s table does not name"
                )
        for name, entry in table.items():
            residual(pack, task, name)
            _check_finite(pack.parts(task, name), f"{f.path}: tensor '{name}'")
            if entry.get("extra_rows", 0):
                rows = pack.parts(task, name).get("extra_rows")
                want = [entry["extra_rows"], *entry["shape"][1:]]
                if rows is None or list(rows.shape) != want:
                    raise PackError(
                        f"{f.path}: tensor '{name}': extra rows missing or not shaped {want}"
                    )
    shared = pack.shared_entries()
    if shared:
        f = pack.check_file(mf.SHARED_FILE)
        for key in f.keys():
            if key.partition(PART_SEP)[0] not in shared:
                raise PackError(f"{f.path}: holds '{key}', which the merge table does not name")
        for name in shared:
            shared_residual(pack, name)
    report = {
        "pack": str(pack.path),
        "format_version": pack.manifest["format_version"],
        "tasks": pack.tasks,
        "files_checked": checked,
        "bytes": sum(f["bytes"] for f in pack.manifest["files"].values()),
        "stray_files": pack.stray_files(),
        "leftover_dirs": pack.leftover_dirs(),
        "base": "not checked",
    }
    if base is not None:
        pack.check_base(checkpoint_fingerprint(Checkpoint(base)), f"{path}")
        report["base"] = "matches"
    return report


def _summary(entries: Iterable[dict]) -> dict:
    params = bytes_ = 0
    sqnrs = []
    codecs: dict[str, int] = {}
    for e in entries:
        params += e["params"]
        bytes_ += e["bytes"]
        codecs[e["codec"]] = codecs.get(e["codec"], 0) + 1
        if e["sqnr_db"] is not None:
            sqnrs.append(e["sqnr_db"])
    return {
        "params": params,
        "bytes": bytes_,
        "bits_per_param": bytes_ * 8 / params if params else 0.0,
        "min_sqnr_db": min(sqnrs) if sqnrs else None,
        "codecs": codecs,
    }


def inspect(path: PathLike, worst: int = 5) -> dict:
    """What a pack holds: per task its bytes, bits/param per module type and overall, the
    codecs used, and the `worst` tensors by SQNR. Reads only the manifest."""
    pack = Pack.open(path)
    base_params = sum(_numel(t["shape"]) for t in pack.base_fingerprint["tensors"].values())
    tasks = {}
    for task in pack.tasks:
        table = pack.entries(task)
        by_type = {
            k: _summary(e for e in table.values() if e["module_type"] == k) for k in MODULE_TYPES
        }
        ranked = sorted(
            ((e["sqnr_db"], n, e["codec"]) for n, e in table.items() if e["sqnr_db"] is not None),
            key=lambda r: r[0],
        )
        tasks[task] = {
            "file_bytes": pack.manifest["files"][mf.task_file(task)]["bytes"],
            "source": pack.manifest["tasks"][task].get("source", ""),
            **_summary(table.values()),
            "by_module_type": {k: v for k, v in by_type.items() if v["params"]},
            "worst_sqnr": [{"tensor": n, "codec": c, "sqnr_db": db} for db, n, c in ranked[:worst]],
        }
    return {
        "pack": str(pack.path),
        "format_version": pack.manifest["format_version"],
        "generator": pack.manifest.get("generator", ""),
        "base_params": base_params,
        "base_bytes_fp32": base_params * 4,
        "merge": _merge_summary(pack),
        "pack_bytes": sum(f["bytes"] for f in pack.manifest["files"].values())
        + (pack.path / mf.NAME).stat().st_size,
        "tasks": tasks,
    }


def _merge_summary(pack: Pack) -> dict | None:
    merge = pack.manifest.get("merge")
    if merge is None:
        return None
    shared = pack.shared_entries()
    return {
        "method": merge["method"],
        "config": merge.get("config", {}),
        "shared": _summary(shared.values()) if shared else None,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
