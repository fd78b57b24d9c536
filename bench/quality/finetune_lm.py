"""Fine-tunes SmolLM2-135M (fp32) as a causal LM on the text of a task of tasks.py, a few dozen
steps, and caches it under bench/.cache/smollm2-<name> (not in git). Real (if short) LLM
fine-tunes for the routing benchmark; issue 5's quality track trains longer.

    .venv/bin/python -m bench.quality.finetune_lm [--steps 40] [--tasks fortune_topic,noun_sense]

About 1.5 s a step (batch 4, 64 tokens) on the project's 2-core machine.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from bench.common import CACHE, smollm2_base
from qmerge.verbs.demo import data as task_data

HERE = Path(__file__).resolve().parent


def finetune_lm(name: str, steps: int = 40, force: bool = False, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE / f"smollm2-{name}"
    if (out / "model.safetensors").is_file() and not force:
        return out
    base = smollm2_base()
    texts = [t for t, _ in task_data.load(name).train]
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rng = random.Random(seed)

    def batch_loss():
        enc = tok(
            rng.sample(texts, 4), return_tensors="pt", padding=True, truncation=True, max_length=64
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return model(**enc, labels=labels).loss

    train(model, steps, 5e-5, batch_loss, name, every=10)
    return save(model, tok, out, {"task": name, "steps": steps})


def train(model, steps: int, lr: float, batch_loss, name: str, every: int) -> None:
    """AdamW over `steps` calls of batch_loss(), logging every `every` steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        loss = batch_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0 or step == steps - 1:
            print(
                f"{name}: step {step} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True
            )
    model.eval()


def save(model, tok, out: Path, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "qmerge-task.json").write_text(json.dumps(meta))
    return out


# The word after the input that asks for the label (fortune_topic's was the first, "Topic").
CUES = {
    "fortune_topic": "Topic",
    "sentiment": "Sentiment",
    "language": "Language",
    "noun_sense": "Category",
    "verb_sense": "Category",
}
# Label words the model answers where a task's labels are codes.
WORDS = {
    "language": {
        "en": "English",
        "de": "German",
        "es": "Spanish",
        "it": "Italian",
        "pl": "Polish",
        "cs": "Czech",
        "pt": "Portuguese",
    }
}


def answer_word(name: str, label: str) -> str:
    return WORDS.get(name, {}).get(label, label)


def answer_prompt(text: str, cue: str = "Topic") -> str:
    """A task input as a prompt whose answer is the label word (the LLM track's format)."""
    return f"{' '.join(text.split()[:40])}\n{cue}:"


def finetune_answers(name: str, steps: int = 150, force: bool = False, seed: int = 0) -> Path:
    """SmolLM2 taught to answer a task's label word after `answer_prompt(text)` (loss on the
    answer tokens only), cached under bench/.cache/smollm2-<name>-answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE / f"smollm2-{name}-answers"
    if (out / "model.safetensors").is_file() and not force:
        return out
    base = smollm2_base()
    task = task_data.load(name)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rng = random.Random(seed)
    pad = tok.eos_token_id

    def batch_loss():
        ids, labels = [], []
        for text, y in rng.sample(task.train, 8):
            p = tok(answer_prompt(text, CUES[name]))["input_ids"]
            a = tok(f" {answer_word(name, task.labels[y])}")["input_ids"] + [tok.eos_token_id]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        n = max(len(x) for x in ids)
        batch = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        lab = torch.tensor([x + [-100] * (n - len(x)) for x in labels])
        return model(input_ids=batch, attention_mask=mask, labels=lab).loss

    train(model, steps, 1e-4, batch_loss, f"{name} answers", every=25)
    return save(model, tok, out, {"task": name, "steps": steps, "format": "answers"})


if __name__ == "__main__":
    from bench.quality.finetune import run_cli

    run_cli(__doc__, finetune_lm, 40, "fortune_topic,noun_sense")
