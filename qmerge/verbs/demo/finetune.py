"""A quick classification fine-tune of an encoder (whole encoder + a head), cached on disk: the
demo's fine-tunes and the quality benchmark's (bench/quality/finetune.py, with its own steps).

The result is a transformers directory (model, tokenizer, `qmerge-task.json` with the recipe).
It is written beside `out` and renamed into place, so an interrupted run leaves no directory
that a later run would take for a finished fine-tune.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qmerge.verbs.demo.data import Task

RECIPE_FILE = "qmerge-task.json"


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune is made; part of its cache key."""

    steps: int = 200
    lr: float = 1e-4
    batch: int = 16
    max_length: int = 64
    warmup: int = 20
    seed: int = 0


def is_done(out: Path, recipe: Recipe | None = None, task: Task | None = None) -> bool:
    """A finished fine-tune is at `out` (made with `recipe`, and for `task`'s labels, when
    given)."""
    meta = out / RECIPE_FILE
    if not (out / "model.safetensors").is_file() or not meta.is_file():
        return False
    try:
        made = json.loads(meta.read_text())
    except ValueError:
        return False
    if recipe is None:
        return True
    if task is not None and made.get("labels") != task.labels:
        return False
    return all(made.get(k) == v for k, v in asdict(recipe).items())


def finetune(
    base: Path,
    task: Task,
    out: Path,
    recipe: Recipe = Recipe(),
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
    log: Callable[[str], None] = lambda _msg: None,
) -> Path:
    """Fine-tunes `base` on `task` (AdamW, linear warm-up then decay, batches sampled with
    the recipe's seed) and saves the model at `out`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(recipe.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialized" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(task.labels),
            id2label=dict(enumerate(task.labels)),
            label2id={label: i for i, label in enumerate(task.labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    steps, warmup = recipe.steps, recipe.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps)
    )
    rng = random.Random(recipe.seed)
    for step in progress(range(steps)):
        batch = rng.sample(task.train, recipe.batch)
        enc = tok(
            [t for t, _ in batch],
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
        )
        loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            log(f"{task.name}: step {step} loss {loss.item():.3f}")
    model.eval()
    return _save(model, tok, out, {"task": task.name, "labels": task.labels, **asdict(recipe)})


def _save(model, tok, out: Path, meta: dict) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / RECIPE_FILE).write_text(json.dumps(meta))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
