"""Why int8 misses 98% next-token agreement on SmolLM2's free-text continuations: the same
merged weights rounded several ways, scored the way `qmerge export` scores them.

    .venv/bin/python -m bench.export_int8_probe     # writes bench/results/export-notes.md (~3 min)

The merged fp32 model of the fortunes task (pack-smollm2-5, bench/export.py) greedily
continues 48 held-out fortunes (first 8 words, 16 tokens); each variant is then run on those
sequences and its next-token argmax compared with the fp32 model's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench.common import CACHE, smollm2_base
from qmerge.format.checkpoint import Checkpoint
from qmerge.verbs.demo import data as task_data
from qmerge.verbs.export.int8 import quantize_rows
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.selection import head, select
from qmerge.verbs.export.target import resolve
from qmerge.verbs.packs import open_pack

ROOT = Path(__file__).resolve().parent

OUT = ROOT / "results" / "export-notes.md"


def rounded(w: torch.Tensor, group: int | None) -> torch.Tensor:
    if group is None:
        q, s = quantize_rows(w)
        return q.float() * s[:, None]
    o, i = w.shape
    g = w.reshape(o, i // group, group)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.round(g / s).clamp(-127, 127) * s).reshape(o, i)


def main() -> None:
    from transformers import AutoTokenizer, GenerationConfig

    torch.set_num_threads(2)
    base = smollm2_base()
    pk = open_pack(CACHE / "pack-smollm2-5")
    sel = select(pk, task="fortunes")
    hd, labels = head(pk, sel)
    job = Job(
        base,
        pk,
        sel,
        resolve(base, pk, hd, labels, torch.float32),
        hd,
        torch.float32,
        _ckpt=Checkpoint(base),
    )
    model = job.merged_model()
    tok = AutoTokenizer.from_pretrained(base)
    held = [" ".join(t.split()[:8]) for t, _ in task_data.load("fortune_topic").test]
    held = [h for h in held if len(h.split()) >= 4][:48]
    eos = model.config.eos_token_id
    cfg = GenerationConfig(
        max_new_tokens=16, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos
    )
    seqs, refs = [], []
    with torch.no_grad():
        for h in held:
            ids = torch.tensor([tok(h)["input_ids"]])
            s = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg
            )
            seqs.append((s, ids.shape[1]))
            refs.append(model(input_ids=s).logits[0, ids.shape[1] - 1 : -1])
    gaps = torch.cat([r.topk(2, -1).values.diff(dim=-1).neg().flatten() for r in refs])

    def agreement(fn) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for name, mod in m.named_modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and name != "lm_head":
                    w = fn(name, mod.weight.data)  # lm_head is tied to the embedding
                    if w is not None:
                        mod.weight.data.copy_(w)
            same = total = 0
            for (s, p), r in zip(seqs, refs, strict=True):
                g = m(input_ids=s).logits[0, p - 1 : -1]
                same += int((g.argmax(-1) == r.argmax(-1)).sum())
                total += r.shape[0]
        return same / total

    emb = ("embed_tokens",)
    variants = [
        (
            "int8 per output channel, every Linear and the (tied) embedding: the export",
            lambda n, w: rounded(w, None),
        ),
        (
            "int8 per channel, Linears only (embedding fp32)",
            lambda n, w: None if n.endswith(emb) else rounded(w, None),
        ),
        (
            "int8 per channel, embedding only (Linears fp32)",
            lambda n, w: rounded(w, None) if n.endswith(emb) else None,
        ),
        ("int8, a scale per 64 columns", lambda n, w: rounded(w, 64)),
        ("int8, a scale per 32 columns", lambda n, w: rounded(w, 32)),
        ("bf16 (every Linear and the embedding)", lambda n, w: w.to(torch.bfloat16).float()),
    ]
    lines = [
        "# Export notes: int8 and near-ties on free text",
        "",
        "Command: `.venv/bin/python -m bench.export_int8_probe`",
        "",
        __doc__.strip(),
        "",
        f"{gaps.numel()} scored positions. The fp32 model's gap between its two best "
        f"logits: 1% of positions under {gaps.quantile(0.01):.3f}, 2% under "
        f"{gaps.quantile(0.02):.3f}, 5% under {gaps.quantile(0.05):.3f}, median "
        f"{gaps.median():.3f}.",
        "",
        "| weights | next-token agreement |",
        "|---|---|",
    ]
    for name, fn in variants:
        a = agreement(fn)
        print(f"{name}: {a:.4f}", flush=True)
        lines.append(f"| {name} | {a:.2%} |")
    lines += [
        "",
        "What this says: finer int8 scales (per 64 or 32 columns) do not raise the "
        "agreement, and even bf16 stays under 98%: the misses are ties of the fp32 model "
        "that any rounding flips, not an int8 defect. Held to the task's form (a label "
        "word after the prompt, bench/results/export.md) int8 agrees on >= 98%.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())


if __name__ == "__main__":
    main()
