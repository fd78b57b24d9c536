"""Fine-tunes all-MiniLM-L6-v2 on each task of tasks.py (whole encoder + a classification head)
and caches the result under bench/.cache/minilm-<task>[-s<seed>] (a transformers directory; not
in git).

    .venv/bin/python -m bench.quality.finetune [--steps 200] [--tasks a,b,...] [--seeds 0,1,2]

A cached fine-tune is reused unless --force. 200 steps of batch 16 at 64 tokens take about
2 minutes per task on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qmerge.errors import DataError
from qmerge.verbs.demo import data as task_data
from qmerge.verbs.demo.finetune import Recipe, is_done
from qmerge.verbs.demo.finetune import finetune as tune

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def minilm_base() -> Path:
    try:
        return task_data.minilm()
    except DataError as e:
        raise SystemExit(str(e)) from None


def finetune(name: str, steps: int, force: bool = False, seed: int = 0) -> Path:
    out = CACHE / (f"minilm-{name}" if seed == 0 else f"minilm-{name}-s{seed}")
    if is_done(out) and not force:
        return out
    recipe = Recipe(steps=steps, lr=1e-4, batch=16, max_length=64, warmup=20, seed=seed)
    t0 = time.time()
    return tune(
        minilm_base(),
        task_data.load(name),
        out,
        recipe,
        log=lambda msg: print(f"{msg} ({time.time() - t0:.0f} s)", flush=True),
    )


def run_cli(doc: str, train, steps: int, tasks: str) -> None:
    """The command line of a fine-tuning script: --steps, --tasks a,b, --force."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--tasks", default=tasks)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    task_data.ensure_data()
    torch.set_num_threads(2)
    for seed in (int(s) for s in a.seeds.split(",")):
        for name in a.tasks.split(","):
            print(train(name, a.steps, a.force, seed=seed))


if __name__ == "__main__":
    run_cli(__doc__, finetune, 200, ",".join(task_data.ALL))
