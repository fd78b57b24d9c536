"""One fine-tune against its base, tensor by tensor: the compressor's inner loop.

The fine-tune is walked tensor by tensor against the base (both memory-mapped), so the process
holds one fp32 delta and the compressed parts of the task being written, never a model: peak
memory does not grow with the number of fine-tunes or with the model's size beyond its largest
tensor. `plan` checks every tensor name and shape against the base before anything is encoded.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qmerge.codecs import CODECS, codec
from qmerge.codecs.base import CodecChoice, exact_sum, sq_chunks
from qmerge.codecs.encode import amax, encode, entry_of
from qmerge.codecs.encode import entry as table_entry
from qmerge.codecs.policy import Policy
from qmerge.codecs.skip import SkipConfig, SkipResidual
from qmerge.errors import CheckpointError, ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.pack import part_key
from qmerge.format.safetensors_io import dtype_name
from qmerge.verbs.progress import bar


@dataclass
class Options:
    """How to compress (shared by compress and add_task).

    Attributes:
        policy: the codec of every tensor (codecs/policy.py).
        calib: calibration inputs per base tensor name, [n, in_features], for codecs that
            calibrate (sign with calibrate=true), for every task.
        calib_texts: calibration texts instead: task (or "*" for every task) -> a text file
            (one text a line, or JSONL with "text") or a list of texts; the base's linear
            layers are run over them (verbs/calibrate.py). A task's texts win over `calib`.
        calib_rows: rows kept per layer from `calib_texts` (the memory bound).
        calib_max_length: tokens kept per calibration text (longer texts are truncated).
        calib_from: which model reads `calib_texts`: "finetune" (each task's own fine-tune,
            the default) or "base" (once for every task; cheaper).
        distill_steps: after encoding, fit each task's 1-bit scales end to end on its
            calibration texts for this many Adam steps (BitDelta's scale distillation,
            verbs/distill.py; 0: off). Needs `calib_texts`.
        distill_lr: the distillation's learning rate (of a multiplier on each scale).
        allow_resized_vocab: a fine-tune whose tensor has more rows than the base's (a grown
            vocabulary) stores the shared rows' delta with its codec and the new rows dense,
            as they are in the fine-tune. Without it, that is an error.
        lossless: store every tensor as an fp32 dense delta (`Policy.lossless()`, which
            replaces `policy`) and check per tensor that base + delta gives back the
            fine-tune's values bit for bit (CheckpointError naming the tensor otherwise).
        adapter_as: how a PEFT LoRA adapter's adapted modules are stored: "lora" (the
            adapter's own factors as `lowrank`, exactly; no dense delta is built) or "policy"
            (the product encoded under `policy` like a fine-tune's delta).
        exclude: fnmatch globs of tensor names to leave out (e.g. a task head "classifier.*").
        heads: fnmatch globs of fine-tune tensors the base does not have (a task head such as
            "classifier.*"): stored as they are, per task, and put back on load.
        progress: show progress bars on stderr.
    """

    policy: Policy = field(default_factory=Policy)
    calib: Mapping[str, Tensor] | None = None
    calib_texts: Mapping[str, object] | None = None
    calib_rows: int = 512
    calib_max_length: int = 128
    calib_from: str = "finetune"
    distill_steps: int = 0
    distill_lr: float = 1e-2
    allow_resized_vocab: bool = False
    lossless: bool = False
    adapter_as: str = "lora"
    exclude: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    progress: bool = True
    # layer inputs per task, computed from calib_texts by compress / add_task
    calib_inputs: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.lossless:
            if self.policy != Policy() and self.policy != Policy.lossless():
                raise ConfigError("lossless stores every tensor as fp32 deltas: give no policy")
            self.policy = Policy.lossless()


def excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """Whether a tensor name matches one of the --exclude globs."""
    return any(fnmatch.fnmatchcase(name, g) for g in exclude)


def _names(ckpt: Checkpoint, exclude: tuple[str, ...]) -> set[str]:
    return {n for n in ckpt.names if not excluded(n, exclude)}


def heads(base: Checkpoint, ft: Checkpoint, opts: Options) -> list[str]:
    """The fine-tune's task-head tensors: named by `opts.heads`, absent from the base."""
    return sorted(
        n
        for n in _names(ft, opts.exclude)
        if n not in base and any(fnmatch.fnmatchcase(n, g) for g in opts.heads)
    )


def plan(base: Checkpoint, ft: Checkpoint, opts: Options) -> dict[str, int]:
    """Checks the fine-tune against the base; returns {tensor: extra rows} for every tensor.

    An integer base tensor the fine-tune does not save (a buffer such as BERT's
    `position_ids`, which newer transformers leave out) is not a weight: it is skipped."""
    ft.align_to(base.names)
    f = _names(ft, opts.exclude) - set(heads(base, ft, opts))
    b = {n for n in _names(base, opts.exclude) if n in f or base.dtype(n).is_floating_point}
    if missing := sorted(b - f):
        raise CheckpointError(
            f"{ft.path}: has no tensor '{missing[0]}' that the base has "
            f"({len(missing)} missing); is it a fine-tune of this base?"
        )
    if extra := sorted(f - b):
        raise CheckpointError(
            f"{ft.path}: has tensor '{extra[0]}' that the base does not "
            f"({len(extra)} extra); keep task heads per task with --head "
            f"GLOB, or leave them out with --exclude GLOB"
        )
    extra_rows = {}
    for n in sorted(b):
        bs, fs = base.shape(n), ft.shape(n)
        extra_rows[n] = 0
        if bs == fs:
            continue
        grown = len(bs) == len(fs) >= 1 and bs[1:] == fs[1:] and fs[0] > bs[0]
        if grown and opts.allow_resized_vocab:
            extra_rows[n] = fs[0] - bs[0]
            continue
        hint = (
            " (a resized vocabulary? pass --allow-resized-vocab to store the new rows densely)"
            if grown
            else ""
        )
        raise CheckpointError(
            f"{ft.path}: tensor '{n}' has shape {list(fs)} but the base's is {list(bs)}{hint}"
        )
    return extra_rows


def _glibc_trim():
    """glibc's malloc_trim, or None where it is missing (not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _glibc_trim()


def release_freed_memory() -> None:
    """Hands freed heap pages back to the OS (after each encoded tensor). glibc keeps the
    blocks of freed tensors (once its dynamic mmap threshold has grown) and fragments between
    the parts a task keeps, so without this the process's memory creeps up by several tensors
    over a model; measured on 12 tensors of 4 MiB: +100 MiB for 24 MiB of live output, +24
    MiB with it. It costs time: the pages handed back are faulted in again, zero-filled, by
    the next tensor's buffers. Compressing 4 SmolLM2-135M fine-tunes took 11.9 s trimming
    after every tensor, 8.1 s after every 8th at the same peak (347 MB), 4.0 s never (775 MB);
    but trimming less often let the heap keep several freed tensors between trims (88-94 MiB
    on the 12 tensors above, against an 80 MiB bound in tests/verbs/test_compress.py), so
    every tensor it is."""
    if _TRIM is not None:
        _TRIM(0)


def _all_finite(d: Tensor) -> bool:
    """NaN or Inf anywhere makes an fp64 sum non-finite (finite fp32 values cannot overflow
    it). Summed a block at a time: `sum(dtype=float64)` over the whole tensor first makes an
    fp64 copy of it (+216 MB for SmolLM2's embedding, measured)."""
    flat = d.reshape(-1)
    step = 1 << 20
    return all(
        math.isfinite(float(flat[i : i + step].sum(dtype=torch.float64)))
        for i in range(0, flat.numel(), step)
    )


def delta(
    base: Checkpoint, ft: Checkpoint, name: str, extra: int, rows: tuple[int, int] | None = None
) -> Tensor:
    """The fp32 delta of one tensor (checked finite), as the encoder sees it; with `rows`
    (a, b), only those rows (of a tensor the fine-tune does not grow)."""
    f, b = ft.get(name), base.get(name)
    if extra:
        f = f[: f.shape[0] - extra]
    first = 0
    if rows is not None:
        first = rows[0]
        f, b = f[rows[0] : rows[1]], b[rows[0] : rows[1]]
    d = f.to(torch.float32, copy=True)  # our own copy: never write into the mapped file
    d.sub_(b)
    if not _all_finite(d):
        i = int((~torch.isfinite(d)).reshape(-1).nonzero()[0])
        idx = list(torch.unravel_index(torch.tensor(i), d.shape)) if d.dim() else []
        where = [int(k) for k in idx]
        if where:
            where[0] += first
        fv, bv = float(f.reshape(-1)[i]), float(b.reshape(-1)[i])
        raise CheckpointError(
            f"{ft.path}: tensor '{name}': the delta is not finite at index "
            f"{where} (fine-tune {fv}, base {bv}); nothing was written"
        )
    return d


def check_exact(
    n: str, base: Checkpoint, ft: Checkpoint, extra: int, d: Tensor, rows: tuple | None = None
) -> None:
    """Raises unless base + d, rounded to the fine-tune's dtype, is the fine-tune's tensor."""
    f, b = ft.get(n), base.get(n)
    if extra:
        f = f[: f.shape[0] - extra]
    if rows is not None:
        f, b = f[rows[0] : rows[1]], b[rows[0] : rows[1]]
    back = (b.to(torch.float32) + d.reshape(b.shape)).to(f.dtype)
    if not torch.equal(back, f):
        i = int((back != f).reshape(-1).nonzero()[0])
        raise CheckpointError(
            f"{ft.path}: tensor '{n}': base + its fp32 delta does not give back the fine-tune "
            f"at flat index {i} ({float(back.reshape(-1)[i])} vs {float(f.reshape(-1)[i])}): "
            "the difference is not representable in fp32; nothing was written"
        )


def encode_rows(
    n: str,
    base: Checkpoint,
    ft: Checkpoint,
    spec: tuple[str, CodecChoice],
    rows: tuple[int, int],
    exact: bool = False,
) -> tuple[dict[str, Tensor], dict]:
    """Rows [a, b) of one tensor through a codec whose rows are independent
    (`Residual.rows_independent`): (their stored parts, the figures `join_rows` needs)."""
    d = delta(base, ft, n, 0, rows)
    _, (name, cfg) = spec
    res = codec(name).residual.from_dense(d, cfg)
    if exact:
        check_exact(n, base, ft, 0, res.dequantize(torch.float32), rows)
    stored = {part_key(n, k): v.contiguous() for k, v in res.parts().items()}
    figures = {
        "amax": amax(d),
        "signal": sq_chunks(d),
        "error": res.error_chunks(d),
        "info": res.info(),
        "params": d.numel(),
    }
    return stored, figures


def join_rows(
    n: str,
    base: Checkpoint,
    ft: Checkpoint,
    spec: tuple[str, CodecChoice],
    pieces: list[tuple[int, dict[str, Tensor], dict]],
    skip_below: float,
) -> tuple[dict[str, Tensor], dict]:
    """The slices of one tensor (row start, stored parts, figures) put together: the stored
    parts and the entry that `encode_tensor` gives for the whole tensor, to the byte."""
    pieces = sorted(pieces, key=lambda p: p[0])
    kind, (name, cfg) = spec
    signal = exact_sum(torch.cat([f["signal"] for _, _, f in pieces]))
    numel = sum(f["params"] for _, _, f in pieces)
    shape, dtype = list(base.shape(n)), dtype_name(ft.dtype(n))
    if max(f["amax"] for _, _, f in pieces) <= skip_below:  # as `encode` decides, whole
        return {}, entry_of("skip", SkipConfig(), kind, shape, dtype, numel, {}, signal, signal, {})
    stored = {k: torch.cat([p[k] for _, p, _ in pieces]) for k in pieces[0][1]}
    error = exact_sum(torch.cat([f["error"] for _, _, f in pieces]))
    info = pieces[0][2]["info"]
    return stored, entry_of(name, cfg, kind, shape, dtype, numel, stored, signal, error, info)


def labels(ft: Checkpoint) -> list[str] | None:
    """The class names of a classification fine-tune (config.json id2label), if it has them."""
    cfg = ft.path / "config.json" if ft.path.is_dir() else None
    try:
        id2label = json.loads(cfg.read_text()).get("id2label") if cfg else None
        if isinstance(id2label, dict) and id2label:
            return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def encode_heads(
    base: Checkpoint, ft: Checkpoint, opts: Options
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """A task's head tensors, stored as they are: (parts keyed 'name:head', head table)."""
    parts, table = {}, {}
    for n in heads(base, ft, opts):
        t = ft.get(n).contiguous()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{ft.path}: head tensor '{n}' holds NaN or inf")
        parts[part_key(n, "head")] = t
        table[n] = {
            "shape": list(t.shape),
            "dtype": dtype_name(t.dtype),
            "bytes": t.numel() * t.element_size(),
        }
    return parts, table


def specs(task: str, base: Checkpoint, opts: Options, names) -> dict[str, tuple[str, CodecChoice]]:
    """(module type, codec choice) of each tensor of `names` for `task`, from the policy."""
    return {n: opts.policy.spec_for(task, n, len(base.shape(n))) for n in names}


def encode_tensor(
    n: str,
    base: Checkpoint,
    ft: Checkpoint,
    spec: tuple[str, CodecChoice],
    extra: int,
    skip_below: float,
    calib: Tensor | None = None,
    planned: Mapping[str, dict | None] | None = None,
    exact: bool = False,
) -> tuple[dict[str, Tensor], dict]:
    """One tensor of one fine-tune: (its stored parts keyed 'name:part', its codec entry).
    `planned` holds the per-tensor keywords of a cross-tensor plan (`plan_groups`); `exact`
    checks that base + the stored delta gives back the fine-tune's values bit for bit."""
    d = delta(base, ft, n, extra)
    kind, choice = spec
    planned = planned or {}
    if n in planned and planned[n] is None:  # a budget gave this tensor nothing
        res, cfg, info_extra = SkipResidual(tuple(d.shape)), SkipConfig(), {}
    else:
        res, cfg, info_extra = encode(d, choice, calib, skip_below, **(planned.get(n) or {}))
    if exact:
        check_exact(n, base, ft, extra, res.dequantize(torch.float32))
    stored = {part_key(n, k): v.contiguous() for k, v in res.parts().items()}
    if extra:
        f = ft.get(n)
        stored[part_key(n, "extra_rows")] = f[f.shape[0] - extra :].clone()
    entry = table_entry(
        res, cfg, kind, list(base.shape(n)), dtype_name(ft.dtype(n)), d, stored, info_extra
    )
    if extra:
        entry["extra_rows"] = extra
    return stored, entry


def encode_task(
    task: str, base: Checkpoint, ft: Checkpoint, opts: Options
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Compresses one fine-tune: (stored tensors keyed 'name:part', codec table)."""
    extra_rows = plan(base, ft, opts)
    spec = specs(task, base, opts, extra_rows)
    planned = {}
    for choice, names in plan_groups(spec).items():
        deltas = (
            (n, delta(base, ft, n, extra_rows[n]))
            for n in bar(names, opts.progress, f"{task}: plan")
        )
        planned.update(codec(choice.name).residual.plan(choice.config, deltas))
    parts: dict[str, Tensor] = {}
    table: dict[str, dict] = {}
    calib = opts.calib_inputs.get(task, opts.calib or {})
    for n in bar(sorted(extra_rows), opts.progress, f"{task}: compress", len(extra_rows)):
        stored, table[n] = encode_tensor(
            n,
            base,
            ft,
            spec[n],
            extra_rows[n],
            opts.policy.skip_below,
            calib.get(n),
            planned,
            opts.lossless,
        )
        parts.update(stored)
        del stored
        release_freed_memory()
    return parts, table


def plan_groups(specs: Mapping[str, tuple[str, CodecChoice]]) -> dict[CodecChoice, list[str]]:
    """The tensors of each codec choice whose config spans tensors (a low-rank byte budget):
    its `plan` sees the deltas of all of them before any is encoded."""
    groups: dict[CodecChoice, list[str]] = {}
    for n, (_, choice) in specs.items():
        if choice.name in CODECS and codec(choice.name).residual.plans(choice.config):
            groups.setdefault(choice, []).append(n)
    return groups
