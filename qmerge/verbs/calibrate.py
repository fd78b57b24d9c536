"""Calibration inputs from texts: what every linear layer of the base sees when it reads them,
for codecs that fit their scales to a layer's outputs (`sign:calibrate=true`).

The base runs over the texts in batches with a forward hook on every linear layer; each hook
keeps the rows of real tokens (padding dropped) up to `max_rows` per layer, so memory is bounded
by the cap (layers x max_rows x in_features floats), not by the number of texts. The result is
keyed by the base checkpoint's tensor names (`<module>.weight`, up to a model prefix), the form
`Options.calib` takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from qmerge.errors import CheckpointError, ConfigError
from qmerge.format.checkpoint import Checkpoint
from qmerge.format.names import alignment
from qmerge.verbs.run import read_texts, tokenizer

PathLike = str | os.PathLike
DEFAULT_MAX_ROWS = 512


def _model(base: Path) -> nn.Module:
    try:
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError:
        raise ConfigError("calibration from texts needs `transformers`") from None
    try:
        cfg = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{base}: no readable config.json ({e})") from None
    causal = "CausalLM" in " ".join(cfg.get("architectures") or [])
    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(base, dtype=torch.float32).eval()


class _Rows:
    """Up to `cap` input rows of one linear layer, gathered batch by batch."""

    def __init__(self, cap: int):
        self.cap, self.n, self.chunks = cap, 0, []

    def add(self, x: Tensor) -> None:
        take = min(self.cap - self.n, x.shape[0])
        if take > 0:
            self.chunks.append(x[:take].float().clone())
            self.n += take

    def tensor(self) -> Tensor:
        return torch.cat(self.chunks)


def layer_inputs(
    base: PathLike,
    texts: Sequence[str],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    batch_size: int = 16,
    max_length: int = 128,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, Tensor]:
    """{base tensor name: the inputs [n <= max_rows, in_features] its linear layer saw} over
    `texts` (real tokens only)."""
    texts = list(texts)
    if not texts:
        raise ConfigError("calibration needs at least one text")
    if max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
    base = Path(base)
    model, tok = _model(base), tokenizer(base)
    names = Checkpoint(base).names
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{base}: the model has no linear layers to calibrate")
    _, rename = alignment([f"{n}.weight" for n, _ in linears], names)
    rows = {rename(f"{n}.weight"): _Rows(max_rows) for n, _ in linears}
    keep: list[Tensor] = []  # the current batch's real-token rows

    def hook(name: str):
        def fn(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows[name].add(x[keep[0]] if x.shape[0] == keep[0].shape[0] else x)

        return fn

    hooks = [m.register_forward_hook(hook(rename(f"{n}.weight"))) for n, m in linears]
    try:
        with torch.no_grad():
            for i in progress(range(0, len(texts), batch_size)):
                enc = tok(
                    texts[i : i + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                )
                mask = enc["attention_mask"].reshape(-1).bool()
                if not bool(mask.any()):
                    raise ConfigError(f"texts {i}..{i + batch_size - 1} tokenize to nothing")
                keep[:] = [mask]
                model(**enc)
                if all(r.n >= max_rows for r in rows.values()):
                    break
    finally:
        for h in hooks:
            h.remove()
    return {n: r.tensor() for n, r in rows.items() if r.n}


def per_task(
    base: PathLike, sources: Mapping[str, object], tasks: Iterable[str], **kwargs
) -> dict[str, dict[str, Tensor]]:
    """Per task, the layer inputs of its calibration texts: `sources` maps a task (or "*" for
    every task) to a text file (one text a line, or JSONL with "text") or a list of texts.
    A source shared by several tasks runs once."""
    tasks = list(tasks)
    if unknown := sorted(set(sources) - set(tasks) - {"*"}):
        raise ConfigError(
            f"calibration texts are given for task {unknown[0]!r}, which is not "
            f"being compressed (tasks: {', '.join(tasks)})"
        )
    done: dict[int, dict[str, Tensor]] = {}
    out = {}
    for t in tasks:
        src = sources.get(t, sources.get("*"))
        if src is None:
            continue
        if id(src) not in done:
            texts = list(src) if isinstance(src, (list, tuple)) else read_texts(src)
            done[id(src)] = layer_inputs(base, texts, **kwargs)
        out[t] = done[id(src)]
    return out
