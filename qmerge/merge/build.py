"""`merge_pack`: a pack's tasks through a merge method into a new pack (shared/DESIGN.md,
"The pack").

The new pack has the same base and tasks. `shared.safetensors` holds the shared delta (encoded
with `shared_codec`); each task file holds the task's exclusive part, if the method has one
(encoded with the `exclusive` policy, or as the method made it, e.g. EMR's masks), and the
task's head, as it was. The manifest's `merge` entry records the method, its config (seeds
included), the source pack and the shared delta's codec table. A model loaded with the new pack
runs W0 + shared + excl_t for task t, and W0 + shared for `base` (the static merge).

The source residuals are read a tensor at a time (every task's, dequantized; for task
arithmetic over 1-bit residuals the sum is taken from the packed bits by `dequant_add_sign`),
so memory holds T copies of one tensor, never a model per task. The new pack is built in a
hidden sibling directory and swapped in at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import qmerge
from qmerge import ops
from qmerge.codecs import Residual, SignResidual, SkipResidual, config_dict
from qmerge.codecs.encode import encode, entry
from qmerge.codecs.mask import MaskConfig, MaskResidual
from qmerge.codecs.policy import Policy, check_spec, module_type
from qmerge.errors import ConfigError, PackError
from qmerge.format import manifest as mf
from qmerge.format.atomic import atomic_file, staged_dir
from qmerge.format.pack import Pack, part_key, write_manifest, write_task_file
from qmerge.format.safetensors_io import write_safetensors
from qmerge.merge.base import METHODS, Merged, TensorCtx, layer_index
from qmerge.merge.base import method as method_of
from qmerge.merge.spec import parse
from qmerge.packs import residual

PathLike = str | os.PathLike
DEFAULT_SHARED_CODEC = "dense:dtype=bf16"


def _shape(pack: Pack, name: str) -> tuple[int, ...]:
    return tuple(pack.base_fingerprint["tensors"][name]["shape"])


def _deltas(pack: Pack, name: str) -> tuple[Tensor, list[Residual | None]]:
    shape = _shape(pack, name)
    res: list[Residual | None] = []
    for t in pack.tasks:
        e = pack.entries(t).get(name)
        if e is not None and e.get("extra_rows", 0):
            raise ConfigError(f"{pack.path}: task {t!r} grows '{name}' by {e['extra_rows']} "
                              f"rows; merging a resized vocabulary is not supported")
        res.append(None if e is None or e["codec"] == "skip" else residual(pack, t, name))
    d = torch.stack([r.dequantize(torch.float32).reshape(shape) if r is not None
                     else torch.zeros(shape) for r in res])
    return d, res


def _sum_from_bits(res: list[Residual | None], scale: float, shape: tuple[int, ...]
                   ) -> Tensor | None:
    """λ Σ_t τ_t straight from packed signs when every task's residual is 1-bit with scales
    of one layout (dequant_add_sign over the stacked bits); None otherwise."""
    if not all(isinstance(r, SignResidual) for r in res) or not res:
        return None
    signs = [r.signs for r in res if isinstance(r, SignResidual)]
    scales = [r.scales.float() for r in res if isinstance(r, SignResidual)]
    if len({tuple(s.shape) for s in scales}) != 1:
        return None
    zero = torch.zeros(signs[0].shape[0], res[0].in_features)  # type: ignore[union-attr]
    alphas = torch.full((len(res),), float(scale))
    return ops.dequant_add_sign(zero, torch.stack(signs), torch.stack(scales), alphas
                                ).reshape(shape)


def merge_pack(pack: PathLike, out: PathLike, method: str, config: Any = None, *,
          shared_codec: str = DEFAULT_SHARED_CODEC, exclusive: Policy | None = None,
          overwrite: bool = False,
          progress: Callable[[Iterable], Iterable] = lambda it: it) -> Pack:
    """Merges the tasks of `pack` with `method` into a new pack at `out`.

    Args:
        pack: a pack (not itself merged).
        out: the directory of the new pack; an existing pack is replaced only with `overwrite`.
        method: a method name, or a spec such as "ties:density=0.2" (then config is None).
        config: the method's config dataclass (default: its defaults).
        shared_codec: codec spec of the shared delta (default "dense:dtype=bf16").
        exclusive: codec policy of the per-task exclusive parts (default: 1-bit signs for
            matrices, dense for vectors).
    """
    src = Pack.open(pack)
    if src.manifest.get("merge") is not None:
        raise PackError(f"{src.path}: is already a merged pack ({src.manifest['merge']['method']}"
                        f"); merge the pack it was made from")
    if not src.tasks:
        raise PackError(f"{src.path}: has no tasks to merge")
    name, cfg = parse(method) if config is None else (method, config)
    if not isinstance(cfg, method_of(name).config):
        raise ConfigError(f"config for {name!r} must be a {METHODS[name].config.__name__}")
    check_spec(shared_codec)
    policy = exclusive or Policy()
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise PackError(f"{out}: is the source pack; write the merge to another directory")
    if out.exists():
        if not (out / mf.NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
            raise PackError(f"{out}: exists and is not an empty directory or a pack")
        if (out / mf.NAME).is_file() and not overwrite:
            raise PackError(f"{out}: a pack already exists; pass --overwrite to replace it")

    tasks = tuple(src.tasks)
    shared_parts: dict[str, Tensor] = {}
    shared_table: dict[str, dict] = {}
    task_parts: dict[str, dict[str, Tensor]] = {t: {} for t in tasks}
    task_tables: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    for n, deltas, result in _merged(src, name, cfg, progress):
        shape = _shape(src, n)
        dtype = src.base_fingerprint["tensors"][n]["dtype"]
        kind = module_type(n)
        shared = result.shared
        decoded_shared = None
        if shared is not None:
            spec = shared_codec if len(shape) >= 2 else policy.vectors
            r, rcfg, info = encode(shared, spec)
            if not isinstance(r, SkipResidual):
                stored = {part_key(n, k): v.contiguous() for k, v in r.parts().items()}
                shared_table[n] = entry(r, rcfg, kind, list(shape), dtype, shared, stored, info)
                shared_parts.update(stored)
                decoded_shared = r.dequantize(torch.float32).reshape(shape)
        for i, t in enumerate(tasks):
            ex = result.exclusive[i] if result.exclusive is not None else None
            if ex is None:
                continue
            if isinstance(ex, MaskResidual):
                if decoded_shared is None:  # no unified delta here: the mask selects nothing
                    continue
                ex.unified = decoded_shared
                target = deltas[i] - ex.unified
                r, rcfg, info = ex, MaskConfig(), {}
            elif isinstance(ex, Residual):
                raise AssertionError(f"method {name} returned an unsupported residual")
            else:
                # the shared delta as stored differs from the method's by its codec's error;
                # the exclusive part makes up for it
                target = ex if shared is None else ex + (shared - (
                    decoded_shared if decoded_shared is not None else 0.0))
                _, spec = policy.spec_for(t, n, len(shape))
                r, rcfg, info = encode(target, spec, None, policy.skip_below)
            if isinstance(r, SkipResidual):
                continue
            stored = {part_key(n, k): v.contiguous() for k, v in r.parts().items()}
            task_tables[t][n] = entry(r, rcfg, kind, list(shape), dtype, target, stored, info)
            task_parts[t].update(stored)
        del deltas, result

    manifest = mf.new(src.base_fingerprint, f"qmerge {qmerge.__version__}")
    with staged_dir(out) as staged:
        for t in tasks:
            parts = dict(task_parts.pop(t))
            info = src.manifest["tasks"][t]
            heads = src.heads(t)
            parts.update({part_key(h, "head"): v.contiguous() for h, v in heads.items()})
            meta = {"qmerge.format": "task", "qmerge.format_version": str(mf.FORMAT_VERSION),
                    "qmerge.task": t, "qmerge.merge": name}
            manifest["files"][mf.task_file(t)] = write_task_file(staged, t, parts, meta)
            manifest["tasks"][t] = {"file": mf.task_file(t), "source": info.get("source", ""),
                                    "tensors": task_tables[t]}
            for key in ("heads", "labels"):
                if key in info:
                    manifest["tasks"][t][key] = info[key]
        merge_entry = {"method": name, "config": config_dict(cfg), "source": str(src.path),
                       "source_manifest_sha256": hashlib.sha256(
                           (src.path / mf.NAME).read_bytes()).hexdigest(),
                       "shared_codec": shared_codec,
                       "exclusive_policy": config_dict(policy) if _has_exclusive(task_tables)
                       else None,
                       "tensors": shared_table}
        if shared_table:
            merge_entry["file"] = mf.SHARED_FILE
            with atomic_file(staged / mf.SHARED_FILE) as f:
                nbytes, sha = write_safetensors(f, shared_parts, {
                    "qmerge.format": "shared", "qmerge.merge": name})
            manifest["files"][mf.SHARED_FILE] = {"sha256": sha, "bytes": nbytes}
        manifest["merge"] = merge_entry
        write_manifest(staged, manifest)
    return Pack.open(out)


def _merged(src: Pack, name: str, cfg: Any, progress: Callable[[Iterable], Iterable]
            ) -> Iterator[tuple[str, Tensor, Merged]]:
    """(tensor name, the tasks' deltas [T, *shape], the method's result) for every tensor some
    task of `src` has, one at a time."""
    names = sorted({n for t in src.tasks for n in src.entries(t)})
    depths = [d for n in src.base_fingerprint["tensors"] if (d := layer_index(n)) is not None]
    n_layers = max(depths) + 1 if depths else 1
    tasks = tuple(src.tasks)
    seed = int(getattr(cfg, "seed", 0))
    for n in progress(names):
        shape = _shape(src, n)
        ctx = TensorCtx(n, layer_index(n), n_layers, tasks, seed)
        deltas, res = _deltas(src, n)
        result: Merged | None = None
        if name == "task_arithmetic":
            fast = _sum_from_bits(res, cfg.scale, shape)
            result = Merged(fast) if fast is not None else None
        if result is None:
            result = METHODS[name].fn(deltas, cfg, ctx)
        del res
        yield n, deltas, result


def shared_deltas(pack: PathLike, method: str, config: Any = None) -> Iterator[tuple[str, Tensor]]:
    """The shared delta of `method` over the tasks of `pack`, per tensor, dense fp32 and not
    encoded (what `merge_pack` would store before its shared codec): for tuning a merge's
    scale in memory, or for analysis. One tensor at a time, like `merge_pack`."""
    src = Pack.open(pack)
    if not src.tasks:
        raise PackError(f"{src.path}: has no tasks to merge")
    name, cfg = parse(method) if config is None else (method, config)
    for n, _, result in _merged(src, name, cfg, lambda it: it):
        if result.shared is not None:
            yield n, result.shared


def _has_exclusive(tables: dict[str, dict[str, dict]]) -> bool:
    return any(e["codec"] != "mask" for table in tables.values() for e in table.values())
