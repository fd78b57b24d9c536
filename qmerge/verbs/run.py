"""Text in, answers out, for the CLI verbs `run` and `fit-router`: tokenizing, batching mixed
requests into one forward (or one `generate`), and reading example / request files.

A request is {"text": str} plus at most one of "task" (a name or 'base'), "coeffs" (a
mixture, 'a:0.7+b:0.3' or {name: weight}) or "auto": true (the pack's router). Whatever the
model's head is decides the answer: a task head (classifier) gives label and scores, a causal
LM head greedy text, a bare encoder its mean-pooled embedding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from qmerge.errors import ConfigError
from qmerge.nn import TaskHead
from qmerge.nn.features import pool
from qmerge.routing.route import BASE, coefficients, parse_route
from qmerge.verbs.load import fit_router, load

PathLike = str | os.PathLike


def _json_lines(path: PathLike) -> list[tuple[int, object]]:
    """(line number, parsed JSON or the stripped text) of every non-blank line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    out: list[tuple[int, object]] = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                out.append((i, json.loads(line)))
            except ValueError as e:
                raise ConfigError(f"{p}:{i}: not valid JSON ({e})") from None
        else:
            out.append((i, line))
    if not out:
        raise ConfigError(f"{p}: is empty")
    return out


def _text_of(path: PathLike, i: int, obj: object, what: str) -> dict:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ConfigError(f'{path}:{i}: {what} needs a string field "text"')
    return obj


def read_texts(path: PathLike) -> list[str]:
    """One example per line, or JSONL objects with a "text" field; blank lines skipped."""
    return [
        obj if isinstance(obj, str) else _text_of(path, i, obj, "a JSON line")["text"]
        for i, obj in _json_lines(path)
    ]


def read_requests(path: PathLike) -> list[dict]:
    """JSONL requests: {"text", and at most one of "task", "coeffs", "auto"}."""
    reqs = []
    for i, obj in _json_lines(path):
        req = _text_of(path, i, obj, "a request")
        if sum(k in req for k in ("task", "coeffs", "auto")) > 1:
            raise ConfigError(f"{path}:{i}: give at most one of task, coeffs, auto")
        reqs.append(req)
    return reqs


def tokenizer(base: PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def kind_of(model) -> str:
    if any(isinstance(m, TaskHead) for m in model.modules()):
        return "classify"
    if hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
        return "generate"
    return "embed"


def _echo(req: dict, route: object) -> object:
    """The route as the request wrote it (a router's choice when it asked for "auto")."""
    return req.get("coeffs", req.get("task", route))


def routes(model, tok, batch: Sequence[dict], max_length: int) -> list:
    """Each request's route entry (a task name, a mixture dict, or 'base'), parsed once;
    requests with "auto" go through the pack's router, all in one base forward."""
    handle = model.qmerge
    out: list = [None] * len(batch)
    auto = [i for i, r in enumerate(batch) if r.get("auto")]
    for i, r in enumerate(batch):
        if "coeffs" in r:
            out[i] = parse_route(r["coeffs"], handle.tasks)
        elif "task" in r:
            out[i] = parse_route(r["task"], handle.tasks)
        elif not r.get("auto"):
            out[i] = BASE
    if auto:
        if handle.router is None:
            raise ConfigError(
                f"{handle.pack.path}: has no router; run `qmerge fit-router` first, or name a task"
            )
        enc = tok(
            [batch[i]["text"] for i in auto],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        f = handle.features(
            dict(enc), handle.router.layer, (handle.router_entry or {}).get("pooling", "mean")
        )
        dense = handle.router.route(f, handle.tasks).dense()
        for k, i in enumerate(auto):
            out[i] = {
                t: float(w) for t, w in zip(handle.tasks, dense[k].tolist(), strict=True) if w
            }
    return out


def route_kwargs(rows: Sequence[object], tasks: Sequence[str]) -> dict:
    """The forward's routing keywords for parsed per-row routes, as ids and numbers (nothing
    is parsed again inside): task= indices when every row names a task (-1: 'base'), else
    coeffs= [B, T] (a name is its one-task mixture)."""
    if all(isinstance(r, str) for r in rows):
        return {"task": [-1 if r == BASE else list(tasks).index(r) for r in rows]}
    return {"coeffs": coefficients(rows, tasks)}


def answer(
    model, tok, batch: list[dict], kind: str, max_new_tokens: int, max_length: int
) -> list[dict]:
    handle = model.qmerge
    rows = routes(model, tok, batch, max_length)
    kw = route_kwargs(rows, handle.tasks)
    if kind == "generate":
        tok.padding_side = "left"
    enc = tok(
        [r["text"] for r in batch],
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
    )
    results = []
    with torch.no_grad():
        if kind == "generate":
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                **kw,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for r, route, ids in zip(batch, rows, new, strict=True):
                results.append(
                    {
                        "text": r["text"],
                        "route": _echo(r, route),
                        "output": tok.decode(ids, skip_special_tokens=True),
                    }
                )
        elif kind == "classify":
            logits = model(**enc, **kw).logits.float()
            for r, route, row in zip(batch, rows, logits, strict=True):
                mix = (route if isinstance(route, dict) else {route: 1.0}) or {BASE: 1.0}
                task = max(mix, key=lambda t: abs(mix[t]))
                labels = handle.labels(task) if task != "base" else None
                n = len(labels) if labels else row.shape[0]
                p = torch.softmax(row[:n], -1)
                best = int(p.argmax())
                results.append(
                    {
                        "text": r["text"],
                        "route": _echo(r, route),
                        "label": labels[best] if labels else best,
                        "scores": {
                            (labels[k] if labels else str(k)): round(float(v), 6)
                            for k, v in enumerate(p)
                        },
                    }
                )
        else:
            h = model(**enc, **kw).last_hidden_state
            emb = pool(h.float(), enc.get("attention_mask"), "mean")
            for r, route, e in zip(batch, rows, emb, strict=True):
                results.append(
                    {
                        "text": r["text"],
                        "route": _echo(r, route),
                        "embedding": [round(float(v), 6) for v in e],
                    }
                )
    return results


def run(
    pack: PathLike,
    base: PathLike,
    requests: Sequence[dict],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 256,
    mode: str = "auto",
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict:
    """Answers requests, `batch_size` at a time, each batch one mixed forward."""
    model = load(base, pack, mode=mode)
    tok = tokenizer(base)
    kind = kind_of(model)
    out: list[dict] = []
    for i in progress(range(0, len(requests), batch_size)):
        out.extend(
            answer(model, tok, list(requests[i : i + batch_size]), kind, max_new_tokens, max_length)
        )
    return {"pack": str(pack), "kind": kind, "results": out}


def fit(
    pack: PathLike,
    base: PathLike,
    examples: dict[str, PathLike],
    *,
    kind: str = "prototype",
    layer: int | None = None,
    mode: str = "top1",
    temperature: float | None = None,
    max_examples: int = 32,
    metric: str | None = None,
    evaluate: dict[str, PathLike] | None = None,
    max_length: int = 128,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict:
    """Fits and saves the pack's router from example files; with `evaluate`, also reports its
    accuracy and confusion matrix on held-out examples per task."""
    model = load(base, pack)
    tok = tokenizer(base)

    def encode(texts):
        return dict(
            tok(
                list(texts),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
        )

    texts = {t: read_texts(p)[:max_examples] for t, p in examples.items()}
    router = fit_router(
        model,
        texts,
        kind=kind,
        layer=layer,
        mode=mode,
        temperature=temperature,
        metric=metric,
        encode=encode,
        progress=progress,
    )
    result = {"pack": str(pack), "router": model.qmerge.router_entry}
    if evaluate:
        result["evaluation"] = evaluate_router(
            model, router, {t: read_texts(p) for t, p in evaluate.items()}, encode
        )
    return result


def evaluate_router(
    model, router, texts: dict[str, Sequence[str]], encode, batch_size: int = 64
) -> dict:
    """Top-1 accuracy of `router` on labeled texts, with the confusion matrix (rows: true)."""
    tasks = list(router.tasks)
    confusion = {t: dict.fromkeys(tasks, 0) for t in texts}
    for t, items in texts.items():
        for i in range(0, len(items), batch_size):
            f = model.qmerge.features(encode(items[i : i + batch_size]), router.layer)
            for p in router.predict(f):
                confusion[t][p] += 1
    total = sum(sum(row.values()) for row in confusion.values())
    right = sum(confusion[t].get(t, 0) for t in confusion)
    return {"accuracy": right / max(total, 1), "examples": total, "confusion": confusion}
