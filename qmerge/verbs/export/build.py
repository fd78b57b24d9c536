"""`export`: one task (or mixture) of a pack, baked into an artifact other runtimes load, checked
against the routed model, and installed atomically.

Steps: open the pack against the base (refused if it is another base), resolve the selection
and the target class, write the format into a hidden staging directory next to `out`, run the
check (check.py: the artifact in a fresh process without qmerge vs `qmerge.load`), write
`qmerge-export.json` (what was exported, the check's numbers, the sizes), then swap the
directory in. A failed write or check leaves `out` as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from qmerge.dtypes import float_dtype
from qmerge.errors import ConfigError
from qmerge.format.atomic import install_dir, temp_sibling
from qmerge.format.checkpoint import Checkpoint
from qmerge.registry import Registry
from qmerge.verbs.export import adapter, gguf, hf, int8, to_onnx
from qmerge.verbs.export.check import eos_ids, probe, verify
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.selection import head, select
from qmerge.verbs.export.target import resolve
from qmerge.verbs.packs import open_pack

FORMATS: Registry[Callable[[Job, Path], dict]] = Registry("export format")
FORMATS.register("hf", hf.write, "a Hugging Face model directory (transformers loads it as-is)")
FORMATS.register(
    "peft", adapter.write, "a PEFT LoRA adapter over the base", "huggingface.co/docs/peft"
)
FORMATS.register("int8", int8.write, "int8 per-channel weights + a small standalone loader")
FORMATS.register("onnx", to_onnx.write, "the merged model for onnxruntime", "onnx.ai")
FORMATS.register(
    "gguf", gguf.write, "the merged causal LM as one GGUF file for llama.cpp", "ggml.ai"
)
FORMATS.register(
    "gguf-lora",
    gguf.write_lora,
    "the task as a llama.cpp LoRA adapter (GGUF) over the base GGUF",
    "github.com/ggml-org/llama.cpp",
)
REPORT = "qmerge-export.json"
PathLike = str | os.PathLike


def _dtype(name: str, base: Checkpoint, fmt: str) -> torch.dtype:
    if name == "auto":
        if fmt in ("onnx", "int8", "peft", "gguf", "gguf-lora"):
            return torch.float32
        floats = [base.dtype(n) for n in base.names if base.dtype(n).is_floating_point]
        return max(set(floats), key=floats.count) if floats else torch.float32
    return float_dtype(name, "dtype (or auto)")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _weights_bytes(source: str) -> int | None:
    path = Path(source)
    if not path.is_dir():
        return None
    files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in files) or None


def export(
    pack: PathLike,
    base: PathLike,
    out: PathLike,
    *,
    fmt: str = "hf",
    task: str | None = None,
    coeffs: str | Mapping[str, float] | None = None,
    shared: bool = False,
    dtype: str = "auto",
    rank: int = 16,
    max_shard_bytes: int = 2 << 30,
    gguf_type: str = "f16",
    gguf_base: PathLike | None = None,
    target: str | None = None,
    texts: list[str] | None = None,
    check_inputs: int = 8,
    new_tokens: int = 16,
    tolerance: float = 1e-3,
    min_agreement: float = 0.9,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict:
    """Exports and checks; returns the report (also written to `out/qmerge-export.json`).

    Args:
        fmt: 'hf', 'peft', 'int8', 'onnx', 'gguf' or 'gguf-lora'.
        task / coeffs / shared: what to bake in (exactly one).
        dtype: of the written floating-point tensors ('auto': the base's; fp32 for onnx).
        rank: peft, gguf-lora: the rank of a truncated SVD of a residual that is not low-rank.
        gguf_type / gguf_base: the GGUF matrices' type; the base GGUF (gguf.py).
        target: peft: 'vllm' writes only what vLLM loads (adapter.py)
        texts: inputs of the check (default: built-in texts through the base's tokenizer).
        check_inputs, new_tokens: how many inputs, and greedy tokens per causal-LM prompt.
        tolerance: an exact export (fp32, nothing lossy) passes at max_rel <= tolerance.
        min_agreement: a lossy export passes at top-1 / next-token agreement >= this.
    """
    write = FORMATS.lookup(fmt)
    _check_options(fmt, target, gguf_base, rank, check_inputs)
    base_dir, out_dir = Path(base), Path(out)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    pk = open_pack(pack, base=base_dir)
    sel = select(pk, task=task, coeffs=coeffs, shared=shared)
    hd, labels = head(pk, sel)
    ckpt = Checkpoint(base_dir)
    dt = _dtype(dtype, ckpt, fmt)
    job = Job(
        base_dir,
        pk,
        sel,
        resolve(base_dir, pk, hd, labels, dt),
        hd,
        dt,
        rank=rank,
        max_shard_bytes=max_shard_bytes,
        gguf_type=gguf_type,
        gguf_base=Path(gguf_base).resolve() if gguf_base is not None else None,
        runtime=target,
        progress=progress,
        _ckpt=ckpt,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_sibling(out_dir, "export")
    staged.mkdir()
    try:
        info = write(job, staged)
        exact = dt == torch.float32 and fmt != "int8" and info.get("exact", True)
        rep = _check(
            job, fmt, staged, texts, check_inputs, new_tokens, exact, tolerance, min_agreement
        )
        report = _report(job, fmt, info, rep, ckpt, labels)
        report["sizes"]["export_bytes"] = dir_bytes(staged)
        (staged / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        install_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    report["out"] = str(out_dir)
    return report


def _check_options(
    fmt: str, target: str | None, gguf_base: PathLike | None, rank: int, check_inputs: int
) -> None:
    if target is not None and fmt != "peft":
        raise ConfigError(f"target {target!r} is an option of the peft format, not {fmt}")
    if gguf_base is not None and fmt != "gguf-lora":
        raise ConfigError("gguf_base (--gguf-base) is an option of the gguf-lora format")
    if gguf_base is not None and not Path(gguf_base).is_file():
        raise ConfigError(f"--gguf-base {gguf_base}: no such file")
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    if check_inputs < 1:
        raise ConfigError(f"check_inputs must be >= 1, got {check_inputs}")


def _check(
    job: Job,
    fmt: str,
    staged: Path,
    texts: list[str] | None,
    check_inputs: int,
    new_tokens: int,
    exact: bool,
    tolerance: float,
    min_agreement: float,
) -> dict:
    """The artifact in `staged`, run by its own runtime in a fresh process, against the
    routed model (check.py)."""
    from qmerge.verbs.load import load

    target = job.target
    model = load(job.base, job.pack, dtype=torch.float32, check_base=False, _only=job.sel.used())
    spec = {
        "format": fmt,
        "dir": str(staged),
        "base_gguf": str(job.gguf_base or staged / gguf.BASE),
        "kind": target.kind,
        "auto": target.auto,
        "base": str(job.base.resolve()),
        "eos": eos_ids(target.config),
        "num_labels": target.config.get("num_labels") if target.kind == "classifier" else None,
    }
    pr = probe(job.base, target.config, texts, check_inputs)
    spec["texts"] = pr.texts
    tokens = new_tokens if target.kind == "causal-lm" else 0
    return verify(model, job.sel, spec, pr, tokens, exact, tolerance, min_agreement)


def _report(
    job: Job, fmt: str, info: dict, rep: dict, ckpt: Checkpoint, labels: list[str] | None
) -> dict:
    """qmerge-export.json: what was exported, the check's numbers, the sizes."""
    pk, sel, target = job.pack, job.sel, job.target
    tasks = pk.manifest["tasks"]
    pack_bytes = sum(
        pk.manifest["files"][tasks[t]["file"]]["bytes"] for t in sel.used() if t in tasks
    )
    sources = {
        t: _weights_bytes(src) if (src := tasks[t].get("source")) else None for t in sel.used()
    }
    base_fp32 = sum(
        4 * math.prod(ckpt.shape(n)) for n in ckpt.names if ckpt.dtype(n).is_floating_point
    )
    return {
        "format": fmt,
        "selection": sel.describe,
        "route": sel.route(),
        "class": target.arch,
        "auto_class": target.auto,
        "kind": target.kind,
        "dtype": str(job.dtype).removeprefix("torch."),
        "base": str(job.base.resolve()),
        "pack": str(pk.path),
        "base_fingerprint": pk.base_fingerprint["content"],
        "labels": labels,
        "written": info,
        "check": rep,
        "sizes": {
            "export_bytes": 0,
            "pack_task_bytes": pack_bytes,
            "finetune_bytes": sources,
            "base_fp32_bytes": base_fp32,
        },
    }
