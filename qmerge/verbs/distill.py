"""Scale distillation (BitDelta): a task's 1-bit scales fitted end to end, so the compressed
model's outputs match the fine-tune's on calibration texts.

Each linear layer whose weight the task stores as `sign` runs as W0 + (s * m) ⊙ signs, with the
encoded scales s fixed and a multiplier m (one per scale, starting at 1) trained by Adam on the
mean squared error between the student's and the fine-tune's outputs (logits of a causal LM,
else the last hidden state) over the texts' real tokens, for a bounded number of steps. The
multiplier makes the step size independent of the scales' magnitude. Only scales change: the
signs, and every other tensor, stay as encoded.

Memory: the base model, the fine-tune, and each tuned layer's signs as fp32 — about three copies
of the model at fp32, whatever the number of tasks (tasks are distilled one at a time).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmerge import ops
from qmerge.codecs.base import sq_sum, sqnr_db
from qmerge.errors import ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.names import alignment
from qmerge.format.pack import part_key
from qmerge.verbs.calibrate import load_model
from qmerge.verbs.run import tokenizer

PathLike = str | os.PathLike


def _student(model: nn.Module, parts: dict[str, Tensor], table: dict[str, dict]) -> dict:
    """Patches every linear layer of `model` stored as signs to run W0 + (s*m) ⊙ signs;
    returns {tensor name: (m, s)}."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    _, rename = alignment([f"{n}.weight" for n, _ in linears], table)
    tuned = {}
    for n, mod in linears:
        key = rename(f"{n}.weight")
        e = table.get(key)
        if e is None or e["codec"] != "sign" or e.get("extra_rows") or len(e["shape"]) != 2:
            continue
        out_f, in_f = e["shape"]
        signs = ops.unpack_signs(parts[part_key(key, "signs")], in_f).float()
        s0 = parts[part_key(key, "scales")].float()
        m = nn.Parameter(torch.ones_like(s0))
        w0 = mod.weight.detach().float()

        def forward(x, mod=mod, w0=w0, signs=signs, s0=s0, m=m, shape=(out_f, in_f)):
            s = ops.reference.expand_scales((s0 * m)[None], *shape)[0]
            return F.linear(x, w0 + s * signs, mod.bias)

        mod.forward = forward
        mod.weight.requires_grad_(False)
        tuned[key] = (m, s0)
    return tuned


def _outputs(out) -> Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def distill_task(
    base: PathLike,
    finetune: PathLike,
    parts: dict[str, Tensor],
    table: dict[str, dict],
    texts: Sequence[str],
    *,
    steps: int,
    lr: float = 1e-2,
    batch_size: int = 8,
    max_length: int = 128,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> int:
    """Fits the scales of one task's 1-bit tensors (`parts`, as `encode_task` made them; its
    table's SQNR and info are updated); returns how many tensors were tuned."""
    if steps < 1:
        raise ConfigError(f"distillation steps must be >= 1, got {steps}")
    if not texts:
        raise ConfigError("scale distillation needs calibration texts")
    teacher = load_model(base, weights=finetune)
    student = load_model(base)
    for p in (*teacher.parameters(), *student.parameters()):
        p.requires_grad_(False)
    tuned = _student(student, parts, table)
    if not tuned:
        return 0
    tok = tokenizer(base)
    tok.padding_side = "right"
    opt = torch.optim.Adam([m for m, _ in tuned.values()], lr=lr)
    texts = list(texts)
    for step in progress(range(steps)):
        start = (step * batch_size) % len(texts)
        chunk = (texts[start:] + texts)[:batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        mask = enc["attention_mask"].bool()
        with torch.no_grad():
            want = _outputs(teacher(**enc)).float()
        got = _outputs(student(**enc)).float()
        loss = (got - want).pow(2)[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    _store(tuned, parts, table, base, finetune, steps)
    return len(tuned)


def _store(tuned: dict, parts, table, base: PathLike, finetune: PathLike, steps: int) -> None:
    """The fitted scales into `parts` (their stored dtype), and each entry's SQNR against the
    task vector recomputed for them."""
    b, f = Checkpoint(base), Checkpoint(finetune).align_to(Checkpoint(base).names)
    for key, (m, s0) in tuned.items():
        k = part_key(key, "scales")
        scales = (s0 * m.detach()).to(parts[k].dtype).contiguous()
        parts[k] = scales
        e = table[key]
        out_f, in_f = e["shape"]
        delta = f.get(key).float() - b.get(key).float()
        signs = ops.unpack_signs(parts[part_key(key, "signs")], in_f).float()
        approx = ops.reference.expand_scales(scales.float()[None], out_f, in_f)[0] * signs
        e["sqnr_db"] = sqnr_db(sq_sum(delta), sq_sum(delta, approx))
        e["info"] = dict(e.get("info") or {}, distilled=steps)
