"""Which 1-bit scales are best, at what cost: mean |τ| (plain), calibrated from texts (each
fine-tune's or the base's layer inputs; qmerge's public path, Options.calib_texts), and BitDelta's
scale distillation (Options.distill_steps), on the quality benchmark's MiniLM track (seed 0, the
cached fine-tunes of bench/quality/finetune.py), routed by the true task.

    .venv/bin/python -m bench.quality.distill [--max-test 200] [--steps 50,200]

Writes bench/results/quality-distill.md. Every setup gets the same 64 training texts per task.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

import qmerge
from bench.quality.finetune import CACHE, finetune, minilm_base
from bench.quality.minilm import MiniLM
from qmerge.codecs.policy import Policy
from qmerge.verbs.demo import data as task_data

RESULTS = Path(__file__).resolve().parents[1] / "results"


def setups(steps: list[int]) -> list[tuple[str, dict]]:
    sign, cal = Policy(codec="sign"), Policy(codec="sign:calibrate=true")
    out = [
        ("plain scales (mean abs τ)", {"policy": sign}),
        ("calibrated, fine-tune inputs (default)", {"policy": cal, "texts": True}),
        ("calibrated, base inputs", {"policy": cal, "texts": True, "calib_from": "base"}),
    ]
    for n in steps:
        out.append((f"distilled {n} steps (from plain)", {"policy": sign, "distill": n}))
    out.append((f"calibrated + distilled {steps[0]} steps", {"policy": cal, "distill": steps[0]}))
    return out


def run(track: MiniLM, work: Path, name: str, how: dict) -> dict:
    opts = qmerge.Options(policy=how["policy"], heads=track.heads, progress=False)
    if how.get("texts") or how.get("distill"):
        opts.calib_texts = {t: track.calib_texts(t) for t in track.names}
        opts.calib_rows = 1 << 20
        opts.calib_max_length = track.calib_max_length
        opts.calib_from = how.get("calib_from", "finetune")
        opts.distill_steps = how.get("distill", 0)
    out = work / name.replace(" ", "_")
    t0 = time.perf_counter()
    qmerge.compress(track.base, track.fts, out, opts=opts)
    seconds = time.perf_counter() - t0
    return {"acc": track.score_pack(out, "oracle"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-test", type=int, default=200)
    ap.add_argument("--steps", default="50,200", help="distillation steps to try")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality-distill.md")
    a = ap.parse_args()
    task_data.ensure_data()
    torch.set_num_threads(2)
    names = list(task_data.ALL)
    fts = {n: finetune(n, 200) for n in names}
    tasks = {n: task_data.load(n) for n in names}
    work = Path(tempfile.mkdtemp(prefix="qmerge-distill-", dir=CACHE))
    try:
        track = MiniLM(minilm_base(), fts, tasks, work, 0, a.max_test)
        ft = track.score_model(track.finetuned)
        rows = []
        for name, how in setups([int(s) for s in a.steps.split(",")]):
            r = run(track, work, name, how)
            rel = sum(r["acc"][t] / ft[t] for t in names) / len(names)
            rows.append((name, r, rel))
            print(f"{name}: {rel:.1%} of the fine-tunes, compress {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(a, names, ft, rows)


def write(a, names: list[str], ft: dict, rows: list) -> None:
    head = "| scales | " + " | ".join(names) + " | avg acc | normalized | compress s (5 tasks) |"
    lines = [
        "# 1-bit scales: plain, calibrated from texts, distilled",
        "",
        f"Command: `.venv/bin/python -m bench.quality.distill --max-test {a.max_test} "
        f"--steps {a.steps}`",
        "",
        f"- {time.strftime('%Y-%m-%d')}; torch {torch.__version__}; all-MiniLM-L6-v2 fine-tuned "
        "200 steps per task (seed 0); every setup routed by the true task, scored with the "
        f"task's head on at most {a.max_test} test texts per task; *normalized* is accuracy ÷ "
        "the fine-tune's, per task, averaged. Calibration and distillation read the same 64 "
        "training texts per task; compress time is the whole `qmerge.compress` of five tasks "
        'on 2 cores. Analysis: quality-notes.md, "Calibrated or distilled scales".',
        "",
        head,
        "|" + "---|" * (len(names) + 4),
        "| individual fine-tunes | "
        + " | ".join(f"{ft[t]:.3f}" for t in names)
        + f" | {sum(ft.values()) / len(ft):.3f} | 100.0% | — |",
    ]
    for name, r, rel in rows:
        acc = r["acc"]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{acc[t]:.3f}" for t in names)
            + f" | {sum(acc.values()) / len(acc):.3f} | {rel:.1%} | {r['seconds']:.0f} |"
        )
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
