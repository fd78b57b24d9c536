"""Calibration inputs from texts: what every linear layer sees when the model reads them, for
codecs that fit their scales to a layer's outputs (`sign:calibrate=true`).

The model runs over the texts in batches with a forward hook on every linear layer; each hook
keeps the rows of real tokens (padding dropped) up to `max_rows` per layer, so memory is bounded
by the cap (layers x max_rows x in_features floats), not by the number of texts. The result is
keyed by the base checkpoint's tensor names (`<module>.weight`, up to a model prefix), the form
`Options.calib` takes.

Which model reads them (`source`): "finetune" (the default) is the base's architecture with each
fine-tune's tensors, so a layer's scales are fitted on the inputs it sees in the model it
approximates (what the quality benchmark measured: 99.6% of the fine-tunes' accuracy); "base"
runs the base once for every task (cheaper, T times fewer forward passes).
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
from qmerge.verbs.progress import quiet_transformers
from qmerge.verbs.run import read_texts, tokenizer

PathLike = str | os.PathLike
DEFAULT_MAX_ROWS = 512


SOURCES = ("finetune", "base")


def load_model(base: Path, weights: PathLike | None = None) -> nn.Module:
    """The base's model class and config, with `weights`' tensors (a fine-tune) if given."""
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
    with quiet_transformers():
        model = cls.from_pretrained(base, dtype=torch.float32).eval()
    if weights is not None:
        _load_weights(model, Checkpoint(weights))
    return model


def _load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Points every parameter of the model that `ckpt` has (up to a name prefix) at the
    checkpoint's tensor: its memory-mapped pages when the dtype matches, so a fine-tune costs
    page cache, not a second copy of the model in the process; parameters the checkpoint
    lacks (tied or untouched) stay the base's."""
    params = dict(model.named_parameters(remove_duplicate=False))
    _, rename = alignment(params, ckpt.names)
    for name, p in params.items():
        src = rename(name)
        if src in ckpt and tuple(ckpt.shape(src)) == tuple(p.shape):
            t = ckpt.get(src)
            p.data = t if t.dtype == p.dtype else t.to(p.dtype)


class _Rows:
    """Up to `cap` input rows of one linear layer, written batch by batch into one buffer
    allocated at the first batch (so the rows are never held twice, as a list of chunks and
    their concatenation would be)."""

    def __init__(self, cap: int):
        self.cap, self.n, self.buf = cap, 0, None

    def add(self, x: Tensor) -> None:
        take = min(self.cap - self.n, x.shape[0])
        if take <= 0:
            return
        if self.buf is None:
            self.buf = torch.empty(self.cap, x.shape[1], dtype=torch.float32)
        self.buf[self.n : self.n + take] = x[:take]
        self.n += take

    def tensor(self) -> Tensor:
        assert self.buf is not None
        return self.buf[: self.n]


def layer_inputs(
    base: PathLike,
    texts: Sequence[str],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    batch_size: int = 16,
    max_length: int = 128,
    progress: Callable[[Iterable], Iterable] = iter,
    weights: PathLike | None = None,
    what: str = "calibration texts",
) -> dict[str, Tensor]:
    """{base tensor name: the inputs [n <= max_rows, in_features] its linear layer saw} over
    `texts` (real tokens only), in the base model or, with `weights`, in the base's
    architecture holding that checkpoint's tensors (a fine-tune)."""
    texts = list(texts)
    if not texts:
        raise ConfigError("calibration needs at least one text")
    if max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
    base = Path(base)
    model, tok = load_model(base, weights), tokenizer(base)
    tok.padding_side = "right"  # real tokens at positions 0..n-1, as when read alone
    names = Checkpoint(base).names
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{base}: the model has no linear layers to calibrate")
    _, rename = alignment([f"{n}.weight" for n, _ in linears], names)
    cap = min(max_rows, len(texts) * max_length)  # no text gives more rows than tokens
    rows = {rename(f"{n}.weight"): _Rows(cap) for n, _ in linears}
    keep: list[Tensor] = []  # the current batch's real-token rows

    def hook(name: str):
        def fn(_m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            rows[name].add(x[keep[0]] if x.shape[0] == keep[0].shape[0] else x)

        return fn

    hooks = [m.register_forward_hook(hook(rename(f"{n}.weight"))) for n, m in linears]
    _skip_logits(model)
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
                    last = min(i + batch_size, len(texts))
                    raise ConfigError(f"{what}: texts {i + 1}..{last} tokenize to nothing")
                keep[:] = [mask]
                model(**enc)
                if all(r.n >= r.cap for r in rows.values()):
                    break
    finally:
        for h in hooks:
            h.remove()
    return {n: r.tensor() for n, r in rows.items() if r.n}


def _skip_logits(model: nn.Module) -> None:
    """The output projection (an LM head) still sees its inputs, but computes nothing: the
    logits of a batch (batch x tokens x vocabulary floats, 400 MB for SmolLM2's 49k words at
    16 x 128) are the largest thing a forward makes, and calibration never reads them. The
    model is calibration's own copy, dropped afterwards."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Linear):
        head.forward = lambda x: x.new_empty(*x.shape[:-1], 0)


def texts_of(src: object) -> list[str]:
    """The texts of a source: a list of texts, or a file (one a line, or JSONL "text")."""
    return list(src) if isinstance(src, (list, tuple)) else read_texts(src)


def per_task(
    base: PathLike,
    sources: Mapping[str, object],
    finetunes: Mapping[str, PathLike],
    source: str = "finetune",
    **kwargs,
) -> dict[str, dict[str, Tensor]]:
    """Per task, the layer inputs of its calibration texts: `sources` maps a task (or "*" for
    every task) to a text file (one text a line, or JSONL with "text") or a list of texts;
    `finetunes` maps each task being compressed to its checkpoint. With source="base" a text
    source shared by several tasks runs once."""
    if source not in SOURCES:
        raise ConfigError(f"calibration source must be one of {', '.join(SOURCES)}, got {source!r}")
    tasks = list(finetunes)
    if unknown := sorted(set(sources) - set(tasks) - {"*"}):
        raise ConfigError(
            f"calibration texts are given for task {unknown[0]!r}, which is not "
            f"being compressed (tasks: {', '.join(tasks)})"
        )
    srcs = {t: s for t in tasks if (s := sources.get(t, sources.get("*"))) is not None}
    # every file read (and refused) before any forward pass
    texts = {id(src): texts_of(src) for src in srcs.values()}
    done: dict[int, dict[str, Tensor]] = {}
    out = {}
    for t, src in srcs.items():
        what = str(src) if isinstance(src, (str, os.PathLike)) else f"task {t!r}'s texts"
        if source == "finetune":
            kwargs["weights"] = finetunes[t]
            out[t] = layer_inputs(base, texts[id(src)], what=what, **kwargs)
        else:
            if id(src) not in done:
                done[id(src)] = layer_inputs(base, texts[id(src)], what=what, **kwargs)
            out[t] = done[id(src)]
    return out
