"""One decoding step of the serve benchmark's batch: 32 sequences over 5 tasks (SmolLM2-135M fp32,
`pack-smollm2-5`, 1-bit sign residuals), against the bare base model's step of the same batch
(issue 29). Writes bench/results/serve-step.md.

    .venv/bin/python -m bench.serve_step [--rounds 5]

Each round pairs the base step with qmerge's step (the op's own path choice), then with
qmerge's step on the path the op took before mixed batches shared the base pass
(QMERGE_SIGN_PATH=per_task), call for call in turns (bench._timing.paired: this VM's speed
swings within seconds), 15 pairs each; the ratio is the median of the per-pair ratios. A
16-token prompt's KV cache, cropped back after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

import qmerge
from bench._timing import paired
from bench.common import CACHE, results_log, smollm2_base
from bench.mixed_prefill import decode_step
from bench.serve import OUT as SERVE_OUT

OUT = SERVE_OUT.with_name("serve-step.md")
PACK = CACHE / "pack-smollm2-5"


def step_pair() -> dict:
    """{'base': the bare base's step, 'qmerge': the patched model's step} of the batch: 32
    sequences over the pack's tasks round-robin, a 16-token prompt each (also run by
    bench/serve_ab.py, with an earlier commit's qmerge)."""
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    base = smollm2_base()
    tasks = list(json.loads((PACK / "manifest.json").read_text())["tasks"])
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ours = qmerge.load(base, PACK)
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (32, 16))
    route = [tasks[i % len(tasks)] for i in range(32)]
    return {"base": decode_step(plain, ids), "qmerge": decode_step(ours, ids, task=route)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not (PACK / "manifest.json").exists():
        raise SystemExit(f"{PACK} is missing: run `python -m bench.serve` once to build it")
    steps = step_pair()
    tasks = list(json.loads((PACK / "manifest.json").read_text())["tasks"])

    def before() -> None:
        os.environ["QMERGE_SIGN_PATH"] = "per_task"
        try:
            steps["qmerge"]()
        finally:
            os.environ.pop("QMERGE_SIGN_PATH", None)

    cmd = f"`.venv/bin/python -m bench.serve_step --rounds {args.rounds}`"
    lines, log = results_log(
        "One decoding step of 32 sequences over 5 tasks", cmd, f"{torch.get_num_threads()} threads"
    )
    log()
    log(f"SmolLM2-135M fp32, tasks {', '.join(tasks)} round-robin over 32 sequences.")
    log()
    log("| round | base ms | qmerge ms | qmerge / base | per_task path / base |")
    log("|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"qmerge": [], "before": []}
    for r in range(args.rounds):
        b, q, rq = paired(steps["base"], steps["qmerge"], 15)
        _, _, rp = paired(steps["base"], before, 15)
        ratios["qmerge"].append(rq)
        ratios["before"].append(rp)
        log(f"| {r + 1} | {b * 1e3:.1f} | {q * 1e3:.1f} | {rq:.2f}x | {rp:.2f}x |")
    q, p = statistics.median(ratios["qmerge"]), statistics.median(ratios["before"])
    ok = "PASS" if q <= 1.3 else "FAIL"
    log()
    log(
        f"- **Median over rounds: qmerge {q:.2f}x the base model's step** (target ≤ 1.3x: {ok}); "
        f"on the per_task path {p:.2f}x."
    )
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
