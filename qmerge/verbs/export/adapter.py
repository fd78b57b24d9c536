"""The `peft` format: the selection's residuals as a PEFT LoRA adapter over the base, which
`PeftModel.from_pretrained(base, dir)` loads and adapter servers (vLLM, LoRAX, S-LoRA) serve.

Per module, what the selected tasks change becomes:
  Linear weight      LoRA: B = [c_1 U_1 | c_2 U_2 ...], A = [V_1; V_2; ...] when every residual
                     is low-rank (exact; rank = the sum), else a truncated SVD of
                     sum_t c_t dequant(tau_t) at `rank` (the energy kept is reported)
  Embedding weight   LoRA on the embedding the same way (and on a tied output layer, so the
                     LM head changes with it as the routed model's does)
  Linear bias        the adapted layer's bias (`bias="lora_only"`), base + delta
  anything else      norms, task heads, a layer whose only change is its bias: the whole
                     module, merged (`modules_to_save`)
Each module's rank is its own (`rank_pattern`), with alpha = rank so the LoRA scale is 1.

`runtime="vllm"` (`--target vllm`) writes only what vLLM loads: LoRA on the Linear layers,
no `modules_to_save`, no bias, no embedding, and one rank for every module from vLLM's set
(VLLM_RANKS: the smallest one that holds the largest module's rank, smaller factors padded with
zeros, which changes nothing). What is left out (changed norms, biases, embeddings, heads) is
reported with its share of the task vector's energy (squared norm), with the SVD's losses.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from qmerge.codecs.runtime import LowRankForm
from qmerge.errors import ConfigError, ExportError
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.merged import delta, energy, residuals

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def factors(job: Job, name: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, dict] | None:
    """(B [out, r], A [r, in], info) with B @ A = the selection's delta of `name`."""
    rs = residuals(job.pack, job.sel, name)
    if not rs:
        return None
    forms = [(c, r.runtime_form()) for c, r in rs]
    if all(isinstance(f, LowRankForm) for _, f in forms):
        us, vs = [], []
        for c, f in forms:
            us.append(f.U.float() * c)
            vs.append(f.V.float())
        return torch.cat(us, 1), torch.cat(vs, 0), {"exact": True}
    d = delta(job.pack, job.sel, name, shape)
    assert d is not None
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(job.rank, s.numel())
    energy = float(s[:r].pow(2).sum() / s.pow(2).sum()) if float(s.pow(2).sum()) else 1.0
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], {"exact": False, "energy": energy}


def energy_left_out(job: Job, changed: list[str], left: list[str], infos: dict) -> float:
    """The share of the selection's task vector (squared norm over the `changed` tensors) an
    adapter does not carry: the tensors in `left` whole, and what a truncated SVD dropped of
    the others (`infos[name]["energy"]`: the share it kept)."""
    total = lost = 0.0
    for s in changed:
        if s in job.head:
            e = float(job.head[s].double().pow(2).sum())
        else:
            e = energy(job.pack, job.sel, s, tuple(job.checkpoint.shape(s)))
        total += e
        if s in left:
            lost += e
        elif not infos.get(s, {"exact": True})["exact"]:
            lost += e * (1 - infos[s]["energy"])
    return lost / total if total else 0.0


def _plan(job: Job, shapes: dict[str, tuple[int, ...]]):
    """(LoRA factors per module path: (B, A, is_embedding), modules saved whole, per-weight
    SVD info) for every module the selection changes."""
    t = job.target
    changed = [n for n in t.names if n in job.head or residuals(job.pack, job.sel, n)]
    by_module: dict[str, set[str]] = {}
    for src in changed:
        by_module.setdefault(t.modules[src], set()).add(src)
    lora: dict[str, tuple[Tensor, Tensor, bool]] = {}
    save: set[str] = set()
    infos = {}
    for mod, srcs in sorted(by_module.items()):
        weight = next((s for s in srcs if s in t.linears or s in t.embeddings), None)
        rest = {t.names[s].rpartition(".")[2] for s in srcs if s != weight}
        if weight is None or srcs & set(job.head) or not rest <= {"bias"}:
            save.add(mod)
            continue
        f = factors(job, weight, shapes[t.names[weight]])
        assert f is not None
        emb = weight in t.embeddings
        lora[mod] = (f[0], f[1], emb)
        infos[weight] = f[2]
        if emb:
            for alias, first in t.tied.items():
                if first == t.names[weight]:
                    lora[alias.rpartition(".")[0]] = (f[0], f[1], False)
    return lora, save, infos, changed


def _fill(job: Job, peft_model, lora: dict, save: set[str], lora_biases: set[str]) -> None:
    """Copies the factors, the adapted biases and the saved modules into the PEFT model."""
    t = job.target
    with torch.no_grad():
        for m, (b, a, emb) in lora.items():
            layer = peft_model.base_model.model.get_submodule(m)
            if emb:
                layer.lora_embedding_A["default"].copy_(b.T)
                layer.lora_embedding_B["default"].copy_(a.T)
            else:
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
            if m in lora_biases:
                layer.base_layer.bias.copy_(job.tensor(t.sources[f"{m}.bias"]))
        for m in save:
            wrapper = peft_model.base_model.model.get_submodule(m)
            copy = wrapper.modules_to_save["default"]
            for pname, p in copy.named_parameters():
                p.copy_(job.tensor(t.sources[f"{m}.{pname}"]))


def write(job: Job, out: Path) -> dict:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("the peft format needs `peft` (pip install peft)") from None
    if job.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"peft adapters are stored in fp32, bf16 or fp16, not {job.dtype}")
    model = job.target.build(torch.float32)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    lora, save, infos, changed = _plan(job, shapes)
    lora_biases = {m for m in lora if f"{m}.bias" in shapes}
    vllm = _for_vllm(job, lora, save, infos, changed, lora_biases) if job.runtime else None
    if not lora:
        raise ExportError(
            f"{job.sel.describe} changes no Linear or Embedding weight; there is "
            f"no LoRA adapter to export (use --format hf)"
        )
    ranks = {m: a.shape[0] for m, (_, a, _) in lora.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    cfg = LoraConfig(
        r=r0,
        lora_alpha=r0,
        lora_dropout=0.0,
        target_modules=sorted(lora),
        rank_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(m): r for m, r in ranks.items() if r != r0},
        bias="lora_only" if lora_biases else "none",
        modules_to_save=sorted(save) or None,
        inference_mode=True,
        base_model_name_or_path=str(job.base.resolve()),
    )
    model.name_or_path = cfg.base_model_name_or_path  # else peft records None
    with warnings.catch_warnings():
        # peft warns that a tied layer is adapted; both sides get the same factors here
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, cfg)
    _fill(job, peft_model, lora, save, lora_biases)
    if job.dtype != torch.float32:
        peft_model = peft_model.to(job.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the base's embedding stays the base's: saving it into the adapter would copy it
        peft_model.save_pretrained(out, save_embedding_layers=False)
    converted = [i for i in infos.values() if not i["exact"]]
    if vllm is not None:
        return dict(vllm, svd_tensors=len(converted), target_modules=len(lora))
    return {
        "target_modules": len(lora),
        "modules_to_save": sorted(save),
        "ranks": dict(Counter(ranks.values())),
        "svd_tensors": len(converted),
        "energy_kept_min": min((i["energy"] for i in converted), default=None),
        "exact": not converted and job.dtype == torch.float32,
    }


def _for_vllm(job: Job, lora: dict, save: set, infos: dict, changed: list, biases: set) -> dict:
    """Cuts the plan down to what vLLM loads (in place) and pads every module to one rank of
    VLLM_RANKS; returns what the report says of it."""
    if job.runtime != "vllm":
        raise ConfigError(f"unknown peft target {job.runtime!r} (the one known: vllm)")
    t = job.target
    kept = {m for m, (_, _, emb) in lora.items() if not emb and f"{m}.weight" in t.sources}
    kept = {m for m in kept if t.sources[f"{m}.weight"] in t.linears}
    for m in set(lora) - kept:
        del lora[m]
    if not lora:
        raise ExportError(f"{job.sel.describe} changes no Linear layer; vLLM has nothing to load")
    save.clear()
    biases.clear()
    carried = {t.sources[f"{m}.weight"] for m in lora}
    left = [s for s in changed if s not in carried]
    top = max(a.shape[0] for _, a, _ in lora.values())
    r = next((r for r in VLLM_RANKS if r >= top), None)
    if r is None:
        raise ExportError(
            f"a module needs rank {top}, above vLLM's largest ({VLLM_RANKS[-1]}); "
            f"export from a pack of lower rank, or pass a smaller --rank"
        )
    for m, (b, a, emb) in lora.items():
        pad = r - a.shape[0]
        lora[m] = (
            torch.nn.functional.pad(b, (0, pad)),
            torch.nn.functional.pad(a, (0, 0, 0, pad)),
            emb,
        )
    return {
        "target": "vllm",
        "rank": r,
        "modules_to_save": [],
        "left_out": sorted(t.names[s] for s in left),
        "energy_left_out": energy_left_out(job, changed, left, infos),
        "energy_kept_min": min(
            (i["energy"] for i in infos.values() if not i["exact"]), default=None
        ),
        "exact": not left
        and all(i["exact"] for i in infos.values())
        and job.dtype == torch.float32,
    }
