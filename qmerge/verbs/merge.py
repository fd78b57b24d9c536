"""`merge_pack`: a pack's tasks through a merge method into a new pack (shared/DESIGN.md,
"The pack"); `shared_deltas`: a method's shared delta in memory.

The new pack has the same base and tasks. `shared.safetensors` holds the shared delta (encoded
with `shared_codec`); each task file holds the task's exclusive part, if the method has one
(encoded with the `exclusive` policy, or as the method made it, e.g. EMR's masks), and the
task's head, as it was. The manifest's `merge` entry records the method, its config (seeds
included), the source pack and the shared delta's codec table. A model loaded with the new pack
runs W0 + shared + excl_t for task t, and W0 + shared for `base` (the static merge).

The source residuals are read a tensor at a time (every task's, dequantized; for a linear
method such as task arithmetic over 1-bit residuals the sum is taken from the packed bits by
`dequant_add_sign`), so memory holds T copies of one tensor, never a model per task. The new
pack goes through the pack writer: built beside `out` and swapped in whole at the end.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qmerge import ops
from qmerge.codecs import Residual, codec, config_dict
from qmerge.codecs.base import CodecChoice, as_matrix
from qmerge.codecs.encode import encode, entry
from qmerge.codecs.policy import Policy, module_type, resolve
from qmerge.codecs.runtime import SignForm
from qmerge.errors import ConfigError, PackError
from qmerge.format import manifest as mf
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.fingerprint import checkpoint_fingerprint
from qmerge.format.pack import Pack, part_key
from qmerge.format.writer import PackWriter
from qmerge.merge.base import Merged, MethodChoice, TensorCtx, layer_index
from qmerge.merge.spec import parse
from qmerge.verbs import executor as executors
from qmerge.verbs.executor import Inline
from qmerge.verbs.packs import residual

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
            raise ConfigError(
                f"{pack.path}: task {t!r} grows '{name}' by {e['extra_rows']} "
                f"rows; merging a resized vocabulary is not supported"
            )
        res.append(None if e is None else residual(pack, t, name))
    d = torch.stack(
        [
            r.dequantize(torch.float32).reshape(shape) if r is not None else torch.zeros(shape)
            for r in res
        ]
    )
    return d, res


def _sum_from_bits(
    res: list[Residual | None], scale: float, shape: tuple[int, ...]
) -> Tensor | None:
    """λ Σ_t τ_t straight from packed signs when every task's residual runs as signs with
    scales of one layout (dequant_add_sign over the stacked bits); None otherwise."""
    forms = [r.runtime_form() if r is not None else None for r in res]
    signs = [f for f in forms if isinstance(f, SignForm)]
    if not forms or len(signs) != len(forms) or len({tuple(f.scales.shape) for f in signs}) != 1:
        return None
    zero = torch.zeros(as_matrix(torch.empty(shape, device="meta")).shape)
    alphas = torch.full((len(signs),), float(scale))
    return ops.dequant_add_sign(
        zero,
        torch.stack([f.packed for f in signs]),
        torch.stack([f.scales.float() for f in signs]),
        alphas,
    ).reshape(shape)


def _contexts(src: Pack, base: str | None = None) -> dict[str, Any]:
    """What every tensor's merge context shares: the model's depth, the tasks, and the base
    checkpoint (for a method that reads the base's weights)."""
    depths = [d for n in src.base_fingerprint["tensors"] if (d := layer_index(n)) is not None]
    ckpt = Checkpoint(base).align_to(src.base_fingerprint["tensors"]) if base else None
    return {"n_layers": max(depths) + 1 if depths else 1, "tasks": tuple(src.tasks), "base": ckpt}


def _check_base(src: Pack, choice: MethodChoice, base: PathLike | None) -> str | None:
    """The base path, checked to be the pack's base: required by a method that needs it,
    and given to any method when it is given (linear without normalize reads it)."""
    if base is None and not choice.method.needs_base:
        return None
    if base is None:
        raise ConfigError(
            f"merge method {choice.method.name!r} reads the base's weights: give --base"
        )
    ckpt = Checkpoint(base)
    src.check_base(checkpoint_fingerprint(ckpt), f"{src.path}: cannot merge over {base}")
    return str(base)


def _merged_tensor(
    src: Pack, choice: MethodChoice, n: str, ctx: dict[str, Any]
) -> tuple[Tensor, Merged]:
    """The tasks' deltas of tensor `n` [T, *shape] and the method's result over them."""
    seed = int(getattr(choice.config, "seed", 0))
    w0 = ctx["base"].get(n).to(torch.float32) if ctx.get("base") is not None else None
    tctx = TensorCtx(n, layer_index(n), ctx["n_layers"], ctx["tasks"], seed, w0)
    deltas, res = _deltas(src, n)
    linear = choice.method.linear
    fast = _sum_from_bits(res, linear(choice.config), _shape(src, n)) if linear else None
    return deltas, Merged(fast) if fast is not None else choice.run(deltas, tctx)


def _names(src: Pack) -> list[str]:
    return sorted({n for t in src.tasks for n in src.entries(t)})


def _merged(
    src: Pack,
    choice: MethodChoice,
    progress: Callable[[Iterable], Iterable],
    base: str | None = None,
) -> Iterator[tuple[str, Tensor, Merged]]:
    """(tensor name, the tasks' deltas [T, *shape], the method's result) for every tensor some
    task of `src` has, one at a time."""
    ctx = _contexts(src, base)
    for n in progress(_names(src)):
        deltas, result = _merged_tensor(src, choice, n, ctx)
        yield n, deltas, result


@dataclass
class _Out:
    """What the new pack will hold, gathered a tensor at a time."""

    tasks: tuple[str, ...]
    shared_parts: dict[str, Tensor] = field(default_factory=dict)
    shared_table: dict[str, dict] = field(default_factory=dict)
    parts: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    tables: dict[str, dict[str, dict]] = field(default_factory=dict)

    def add(
        self,
        task: str | None,
        n: str,
        r: Residual,
        cfg: Any,
        target: Tensor,
        shape: tuple[int, ...],
        dtype: str,
        info: dict,
    ) -> None:
        stored = {part_key(n, k): v.contiguous() for k, v in r.parts().items()}
        e = entry(r, cfg, module_type(n), list(shape), dtype, target, stored, info)
        if task is None:
            self.shared_table[n], parts = e, self.shared_parts
        else:
            self.tables.setdefault(task, {})[n] = e
            parts = self.parts.setdefault(task, {})
        parts.update(stored)


def _encode_tensor(
    out: _Out,
    n: str,
    shape: tuple[int, ...],
    dtype: str,
    deltas: Tensor,
    result: Merged,
    shared_codec: CodecChoice,
    policy: Policy,
) -> None:
    """Encodes one tensor's shared delta and the tasks' exclusive parts into `out`."""
    shared, decoded = result.shared, None
    if shared is not None:
        choice = shared_codec if len(shape) >= 2 else policy.choice(policy.vectors)
        r, rcfg, info = encode(shared, choice)
        if not r.is_zero:
            out.add(None, n, r, rcfg, shared, shape, dtype, info)
            decoded = r.dequantize(torch.float32).reshape(shape)
    for i, t in enumerate(out.tasks):
        ex = result.exclusive[i] if result.exclusive is not None else None
        if ex is None:
            continue
        if isinstance(ex, Residual):
            if not ex.needs_shared:
                raise AssertionError(
                    f"a merge method returned a {ex.codec} residual; methods "
                    f"return dense parts or residuals over the shared delta"
                )
            if decoded is None:  # no shared delta here: the residual selects nothing
                continue
            ex.unified = decoded
            target = deltas[i] - decoded
            r, rcfg, info = ex, codec(ex.codec).config(), {}
        else:
            # the shared delta as stored differs from the method's by its codec's error; the
            # exclusive part makes up for it
            target = (
                ex if shared is None else ex + (shared - (decoded if decoded is not None else 0.0))
            )
            _, choice = policy.spec_for(t, n, len(shape))
            r, rcfg, info = encode(target, choice, None, policy.skip_below)
        if not r.is_zero:
            out.add(t, n, r, rcfg, target, shape, dtype, info)


def _check_out(src: Pack, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.path.resolve():
        raise PackError(f"{out}: is the source pack; write the merge to another directory")
    if out.exists():
        if not (out / mf.NAME).is_file() and (not out.is_dir() or any(out.iterdir())):
            raise PackError(f"{out}: exists and is not an empty directory or a pack")
        if (out / mf.NAME).is_file() and not overwrite:
            raise PackError(f"{out}: a pack already exists; pass --overwrite to replace it")


def _source(pack: PathLike) -> Pack:
    src = Pack.open(pack)
    if src.manifest.get("merge") is not None:
        raise PackError(
            f"{src.path}: is already a merged pack ({src.manifest['merge']['method']}"
            f"); merge the pack it was made from"
        )
    if not src.tasks:
        raise PackError(f"{src.path}: has no tasks to merge")
    return src


def merge_pack(
    pack: PathLike,
    out: PathLike,
    method: str | MethodChoice,
    config: Any = None,
    *,
    shared_codec: str | CodecChoice = DEFAULT_SHARED_CODEC,
    exclusive: Policy | None = None,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    executor: str | Inline | None = None,
    base: PathLike | None = None,
) -> Pack:
    """Merges the tasks of `pack` with `method` into a new pack at `out`.

    Args:
        pack: a pack (not itself merged).
        out: the directory of the new pack; an existing pack is replaced only with `overwrite`.
        method: a method name, a spec such as "ties:density=0.2" (then config is None), or a
            parsed MethodChoice.
        config: the method's config dataclass (default: its defaults).
        shared_codec: codec spec of the shared delta (default "dense:dtype=bf16").
        exclusive: codec policy of the per-task exclusive parts (default: 1-bit signs for
            matrices, dense for vectors).
        executor: "local" (default: this process), "ray" (groups of tensors on a local Ray),
            or an executor object (verbs/executor.py); the pack's bytes are the same.
        base: the pack's base checkpoint, for a method that reads the base's weights (SLERP);
            checked against the pack's fingerprint.
    """
    src = _source(pack)
    choice = parse(method, config)
    base_path = _check_base(src, choice, base)
    shared_choice = resolve(shared_codec)
    policy = exclusive or Policy()
    out = Path(out)
    _check_out(src, out, overwrite)
    run = executors.resolve(executor)
    if run is None:
        acc = _merge_here(src, choice, shared_choice, policy, progress, base_path)
        with PackWriter.create(out, src.base_fingerprint, overwrite=overwrite) as w:
            _put(w, src, acc, choice, config, shared_codec, shared_choice, policy)
        return Pack.open(out)
    from qmerge.verbs import merge_units

    run.start()

    with PackWriter.create(out, src.base_fingerprint, overwrite=overwrite) as w:
        with w.fragments() as scratch:
            acc = merge_units.merged(
                run, src, _names(src), choice, shared_choice, policy, scratch, progress, base_path
            )
            _put(w, src, acc, choice, config, shared_codec, shared_choice, policy)
    return Pack.open(out)


def _merge_here(
    src: Pack,
    choice: MethodChoice,
    shared_choice: CodecChoice,
    policy: Policy,
    progress: Callable[[Iterable], Iterable],
    base: str | None = None,
) -> _Out:
    acc = _Out(tuple(src.tasks))
    for n, deltas, result in _merged(src, choice, progress, base):
        _encode_tensor(
            acc,
            n,
            _shape(src, n),
            src.base_fingerprint["tensors"][n]["dtype"],
            deltas,
            result,
            shared_choice,
            policy,
        )
        del deltas, result
    return acc


def _put(
    w: PackWriter,
    src: Pack,
    acc: _Out,
    choice: MethodChoice,
    config: Any,
    shared_codec: str | CodecChoice,
    shared_choice: CodecChoice,
    policy: Policy,
) -> None:
    """The merged tasks and the shared delta into the new pack's transaction."""
    name = choice.method.name
    has_exclusive = any(
        not codec(e["codec"]).residual.needs_shared
        for table in acc.tables.values()
        for e in table.values()
    )
    for t in acc.tasks:
        info = src.manifest["tasks"][t]
        parts = dict(acc.parts.pop(t, {}))
        parts.update({part_key(h, "head"): v.contiguous() for h, v in src.heads(t).items()})
        task_entry = {"source": info.get("source", ""), "tensors": acc.tables.get(t, {})}
        task_entry.update({k: info[k] for k in ("heads", "labels") if k in info})
        w.put_task(t, parts, task_entry, {"qmerge.merge": name})
    w.set_shared(
        acc.shared_parts,
        {
            "method": name,
            "config": config_dict(choice.config),
            "source": str(src.path),
            "source_manifest_sha256": hashlib.sha256((src.path / mf.NAME).read_bytes()).hexdigest(),
            "shared_codec": shared_codec if isinstance(shared_codec, str) else str(shared_choice),
            "exclusive_policy": config_dict(policy) if has_exclusive else None,
            "tensors": acc.shared_table,
        },
        {"qmerge.merge": name},
    )


def shared_deltas(
    pack: PathLike, method: str | MethodChoice, config: Any = None, base: PathLike | None = None
) -> Iterator[tuple[str, Tensor]]:
    """The shared delta of `method` over the tasks of `pack`, per tensor, dense fp32 and not
    encoded (what `merge_pack` would store before its shared codec): for tuning a merge's
    scale in memory, or for analysis. One tensor at a time, like `merge_pack`."""
    src = Pack.open(pack)
    if not src.tasks:
        raise PackError(f"{src.path}: has no tasks to merge")
    choice = parse(method, config)
    for n, _, result in _merged(src, choice, lambda it: it, _check_base(src, choice, base)):
        if result.shared is not None:
            yield n, result.shared
