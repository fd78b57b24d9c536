"""The `gguf` and `gguf-lora` formats: llama.cpp's files.

gguf       the task or mixture merged into the base, one `model.gguf`: hyperparameters,
           tokenizer (gguf_vocab.py) and tensors renamed to llama.cpp's layout
           (gguf_arch.py), matrices in `--gguf-type` (f32, f16, bf16, q8_0, q4_0), vectors F32.
gguf-lora  the task's residuals as llama.cpp's LoRA adapter `adapter.gguf`
           (general.type = adapter), which llama.cpp applies over the base GGUF per request
           with its own scale. A low-rank residual goes in exactly; a 1-bit or dense one as a
           truncated SVD at `rank` (the energy kept is reported). What llama.cpp's LoRA cannot
           carry (changed norms; an embedding whose output layer is tied to it) is left out,
           with its share of the task vector's energy reported. Without `gguf_base`, the base
           itself is written beside the adapter as `base.gguf` at the same type.

The model streams: memory holds one tensor (and its encoded bytes), written as it is computed.
The adapter holds its factors (rank x the layer's sides) until they are written.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import Tensor

from qmerge.errors import ConfigError, ExportError
from qmerge.verbs.export import gguf_vocab
from qmerge.verbs.export.adapter import factors
from qmerge.verbs.export.gguf_arch import Arch, arch, encode, file_type, gguf, storage
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.merged import energy, residuals

MODEL = "model.gguf"
ADAPTER = "adapter.gguf"
BASE = "base.gguf"
LORA_TYPES = ("f32", "f16", "bf16")


def _arch(job: Job) -> Arch:
    if job.target.kind != "causal-lm":
        raise ConfigError(
            f"GGUF export is for causal LMs; this pack's target is a {job.target.kind} "
            f"({job.target.arch})"
        )
    return arch(job.target.config)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    g = gguf()
    block, size = g.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def _stream(w, path: Path, items: list, make: Callable[[tuple], np.ndarray], progress) -> None:
    """Declares every tensor, writes the header, then each tensor's bytes as it is made."""
    for name, shape, qtype, *_ in items:
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for item in progress(items):
            w.write_tensor_data(make(item))
    finally:
        w.close()


def write_model(job: Job, path: Path, tensor: Callable[[str], Tensor], name: str) -> dict:
    """A complete GGUF model of the target (merged weights from `tensor(pack name)`)."""
    g, a = gguf(), _arch(job)
    items = []
    for src, dst in sorted(job.target.names.items(), key=lambda kv: kv[1]):
        shape = tuple(job.checkpoint.shape(src))
        if not job.checkpoint.dtype(src).is_floating_point:
            continue  # integer buffers (none in a Llama) have no place in llama.cpp
        items.append((a.rename(dst), shape, storage(job.gguf_type, dst, shape), src, dst))
    w = g.GGUFWriter(None, a.name)
    w.add_type("model")
    w.add_name(name)
    a.metadata(w)
    w.add_file_type(file_type(job.gguf_type))
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    vocab = gguf_vocab.add(w, job.base, int(job.target.config["vocab_size"]))

    def make(item):
        _, _, qtype, src, dst = item
        return encode(a.reorder_rows(dst, tensor(src)), qtype)

    _stream(w, path, items, make, job.progress)
    kinds: dict[str, int] = {}
    for _, _, q, *_ in items:
        kinds[q.name] = kinds.get(q.name, 0) + 1
    return {"file": path.name, "tensors": len(items), "types": kinds, "tokenizer": vocab}


def write(job: Job, out: Path) -> dict:
    info = write_model(job, out / MODEL, job.tensor, f"{job.base.name} {job.sel.describe}")
    info["gguf_type"] = job.gguf_type
    info["exact"] = job.gguf_type == "f32"
    return info


def _energy(job: Job, name: str) -> float:
    return energy(job.pack, job.sel, name, tuple(job.checkpoint.shape(name)))


def _lora_plan(job: Job):
    """(linears and embeddings the adapter carries, tensors left out) of the selection."""
    t = job.target
    tied = set(t.tied.values())
    changed = [s for s in sorted(t.names) if residuals(job.pack, job.sel, s)]
    changed += [s for s in job.pack.shared_entries() if s in t.names and s not in changed]
    carried, left = [], []
    for s in changed:
        embedding_tied = s in t.embeddings and t.names[s] in tied
        (carried if (s in t.linears or s in t.embeddings) and not embedding_tied else left).append(
            s
        )
    return carried, left


def write_lora(job: Job, out: Path) -> dict:
    g, a = gguf(), _arch(job)
    if job.gguf_type not in LORA_TYPES:
        raise ConfigError(f"a GGUF LoRA is stored in {', '.join(LORA_TYPES)}, not {job.gguf_type}")
    carried, left = _lora_plan(job)
    if not carried:
        raise ExportError(f"{job.sel.describe} changes no matrix llama.cpp's LoRA can carry")
    qtype = storage(job.gguf_type, "lora", (1, 1))
    items, ranks, energy_all, energy_lost, svd = [], [], 0.0, 0.0, []
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in job.progress(carried):
        shape = tuple(job.checkpoint.shape(s))
        b, am, info = factors(job, s, shape)
        ranks.append(int(am.shape[0]))
        e = _energy(job, s)
        energy_all += e
        if not info["exact"]:
            svd.append(info["energy"])
            energy_lost += e * (1 - info["energy"])
        dst = job.target.names[s]
        name = a.rename(dst)
        if s in job.target.embeddings:  # llama.cpp's layout for token_embd (llm_build_inp_embd)
            la, lb = b, am.T
        else:
            la, lb = am, a.reorder_rows(dst, b)
        pairs[name] = (encode(la, qtype), encode(lb, qtype))
        items.append((f"{name}.lora_a", tuple(la.shape), qtype, name, 0))
        items.append((f"{name}.lora_b", tuple(lb.shape), qtype, name, 1))
    left_energy = sum(_energy(job, s) for s in left)
    energy_all += left_energy
    w = g.GGUFWriter(None, a.name)
    w.add_type("adapter")
    w.add_string(g.Keys.Adapter.TYPE, "lora")
    # alpha 0: llama.cpp scales B A by the request's adapter scale alone (no alpha / rank)
    w.add_float32(g.Keys.Adapter.LORA_ALPHA, 0.0)
    w.add_name(f"{job.base.name} {job.sel.describe}")
    _stream(w, out / ADAPTER, items, lambda it: pairs[it[3]][it[4]], iter)
    base = None
    if job.gguf_base is None:
        base = write_model(job, out / BASE, lambda s: job.checkpoint.get(s).float(), job.base.name)
    lost = (energy_lost + left_energy) / energy_all if energy_all else 0.0
    return {
        "file": ADAPTER,
        "gguf_type": job.gguf_type,
        "lora_tensors": len(carried),
        "ranks": dict(sorted(Counter(ranks).items())),
        "left_out": [job.target.names[s] for s in left],
        "energy_left_out": lost,
        "svd_tensors": len(svd),
        "energy_kept_min": min(svd, default=None),
        "base_gguf": str(job.gguf_base) if job.gguf_base else BASE,
        "base_written": base,
        "exact": not left and not svd and job.gguf_type == "f32",
    }
