"""The `gguf` and `gguf-lora` formats: llama.cpp's files.

gguf       the task or mixture merged into the base, one `model.gguf`: hyperparameters,
           tokenizer (gguf_vocab.py) and tensors renamed to llama.cpp's layout
           (gguf_arch.py), matrices in `--gguf-type` (f32, f16, bf16, q8_0, q5_0, q4_1,
           q4_0; the output layer a step above a quantized type unless `:output=` says),
           vectors F32.
gguf-lora  the task's residuals as llama.cpp's LoRA adapter `adapter.gguf`
           (general.type = adapter), which llama.cpp applies over the base GGUF per request
           with its own scale. A low-rank residual goes in exactly; a 1-bit or dense one as a
           truncated SVD at `rank` (the energy kept is reported). Without `gguf_base`, the base
           is written beside the adapter as `base.gguf` at the same type, its tied output
           layer as a tensor of its own (`output.weight`) so that the adapter changes the
           embedding on both sides, as the routed model does. What llama.cpp's LoRA cannot
           carry is left out, with its share of the task vector's energy reported: changed
           norms (llama.cpp skips adapter norms), and the embedding when a given `gguf_base`
           shares one tensor between embedding and output.

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
from qmerge.verbs.export.adapter import energy_left_out, factors
from qmerge.verbs.export.gguf_arch import Arch, arch, encode, file_type, gguf, types
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.merged import residuals

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
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for item in progress(items):
            w.write_tensor_data(make(item))
    finally:
        w.close()


def write_model(
    job: Job, path: Path, tensor: Callable[[str], Tensor], name: str, untie: bool = False
) -> dict:
    """A complete GGUF model of the target (merged weights from `tensor(pack name)`). With
    `untie`, a tied output layer is written as its own `output.weight` (a copy of the
    embedding), so that an adapter can change the embedding on both sides."""
    g, a, ty = gguf(), _arch(job), types(job.gguf_type)
    pairs = sorted(job.target.names.items(), key=lambda kv: kv[1])
    if untie:
        pairs += [(job.target.sources[first], alias) for alias, first in job.target.tied.items()]
    items = []
    for src, dst in pairs:
        shape = tuple(job.checkpoint.shape(src))
        if not job.checkpoint.dtype(src).is_floating_point:
            continue  # integer buffers (none in a Llama) have no place in llama.cpp
        items.append((a.rename(dst), shape, ty.of(dst, shape), src, dst))
    w = g.GGUFWriter(None, a.name)
    w.add_type("model")
    w.add_name(name)
    a.metadata(w)
    w.add_file_type(file_type(ty.matrices))
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    vocab = gguf_vocab.add(w, job.base, int(job.target.config["vocab_size"]))

    def make(item):
        _, _, qtype, src, dst = item
        return encode(a.reorder_rows(dst, tensor(src)), qtype)

    _stream(w, path, items, make, job.progress)
    kinds: dict[str, int] = {}
    for _, _, q, *_ in items:
        kinds[q.name] = kinds.get(q.name, 0) + 1
    info = {"file": path.name, "tensors": len(items), "types": kinds, "tokenizer": vocab}
    return info | ({"untied_output": True} if untie and job.target.tied else {})


def write(job: Job, out: Path) -> dict:
    info = write_model(job, out / MODEL, job.tensor, f"{job.base.name} {job.sel.describe}")
    ty = types(job.gguf_type)
    info["gguf_type"], info["output_type"] = ty.matrices, ty.output
    info["exact"] = ty.matrices == ty.output == "f32"
    return info


def _base_has_output(job: Job, a: Arch) -> bool:
    """Whether the base GGUF the adapter runs over has its own output layer: then an adapter
    changes a tied embedding on both sides (token_embd, output); else llama.cpp would apply a
    token_embd adapter to the shared output tensor with the embedding's layout and abort."""
    if not job.target.tied:
        return True
    if job.gguf_base is None:
        return True  # base.gguf is written untied
    try:
        shapes = {
            t.name: tuple(int(x) for x in reversed(t.shape))
            for t in gguf().GGUFReader(job.gguf_base).tensors
        }
    except (OSError, ValueError) as e:
        raise ConfigError(f"--gguf-base {job.gguf_base}: not a readable GGUF file ({e})") from None
    for src, dst in job.target.names.items():
        want = tuple(job.checkpoint.shape(src))
        if shapes.get(a.rename(dst)) != want:
            raise ConfigError(
                f"--gguf-base {job.gguf_base}: '{a.rename(dst)}' is "
                f"{list(shapes.get(a.rename(dst), ())) or 'missing'}, this base's '{dst}' is "
                f"{list(want)}; not a GGUF of this base"
            )
    names = set(shapes)
    return "output.weight" in names


def _lora_plan(job: Job, untied: bool):
    """(linears and embeddings the adapter carries, tensors left out) of the selection."""
    t = job.target
    tied = set(t.tied.values())
    changed = [s for s in sorted(t.names) if residuals(job.pack, job.sel, s)]
    changed += [s for s in job.pack.shared_entries() if s in t.names and s not in changed]
    carried, left = [], []
    for s in changed:
        ok = s in t.linears or (s in t.embeddings and (untied or t.names[s] not in tied))
        (carried if ok else left).append(s)
    return carried, left


def _pairs(job: Job, a: Arch, s: str, b: Tensor, am: Tensor) -> list[tuple[str, Tensor, Tensor]]:
    """(GGUF name, lora_a, lora_b) of pack tensor `s` with delta b @ am, in llama.cpp's
    layouts: a Linear's A [r, in] and B [out, r] (Q/K rows reordered); token_embd's
    A [vocab, r] and B [dim, r] (llm_build_inp_embd); a tied output layer as a Linear."""
    t = job.target
    dst = t.names[s]
    if s not in t.embeddings:
        return [(a.rename(dst), am, a.reorder_rows(dst, b))]
    out = [(a.rename(dst), b, am.T)]
    for alias, first in t.tied.items():
        if first == dst:
            out.append((a.rename(alias), am, b))
    return out


def write_lora(job: Job, out: Path) -> dict:
    g, a = gguf(), _arch(job)
    ty = types(job.gguf_type)
    if ty.matrices not in LORA_TYPES:
        raise ConfigError(f"a GGUF LoRA is stored in {', '.join(LORA_TYPES)}, not {ty.matrices}")
    untied = _base_has_output(job, a)
    carried, left = _lora_plan(job, untied)
    if not carried:
        raise ExportError(f"{job.sel.describe} changes no matrix llama.cpp's LoRA can carry")
    qtype = ty.of("lora", (1, 1))
    items, ranks, infos = [], [], {}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in job.progress(carried):
        b, am, infos[s] = factors(job, s, tuple(job.checkpoint.shape(s)))
        ranks.append(int(am.shape[0]))
        for name, la, lb in _pairs(job, a, s, b, am):
            pairs[name] = (encode(la, qtype), encode(lb, qtype))
            items.append((f"{name}.lora_a", tuple(la.shape), qtype, name, 0))
            items.append((f"{name}.lora_b", tuple(lb.shape), qtype, name, 1))
    w = g.GGUFWriter(None, a.name)
    w.add_type("adapter")
    w.add_string(g.Keys.Adapter.TYPE, "lora")
    # alpha 0: llama.cpp scales B A by the request's adapter scale alone (no alpha / rank)
    w.add_float32(g.Keys.Adapter.LORA_ALPHA, 0.0)
    w.add_name(f"{job.base.name} {job.sel.describe}")
    _stream(w, out / ADAPTER, items, lambda it: pairs[it[3]][it[4]], iter)
    base = None
    if job.gguf_base is None:
        base = write_model(
            job, out / BASE, lambda s: job.checkpoint.get(s).float(), job.base.name, untie=True
        )
    svd = [i["energy"] for i in infos.values() if not i["exact"]]
    return {
        "file": ADAPTER,
        "gguf_type": job.gguf_type,
        "lora_tensors": len(pairs),
        "ranks": dict(sorted(Counter(ranks).items())),
        "left_out": [job.target.names[s] for s in left],
        "energy_left_out": energy_left_out(job, carried + left, left, infos),
        "svd_tensors": len(svd),
        "energy_kept_min": min(svd, default=None),
        "base_gguf": str(job.gguf_base) if job.gguf_base else BASE,
        "base_written": base,
        "exact": not left and not svd and ty.matrices == "f32",
    }
