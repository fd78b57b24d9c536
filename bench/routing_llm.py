"""Routed inference on SmolLM2-135M, the causal-LM half of bench/routing.py (which runs it and
writes the results): one mixed-batch `generate` against each task's merged model, and the
resident memory of serving 5 tasks (each configuration in a fresh process: this file's
`--child MODE`).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import qmerge
from bench.common import CACHE, perturbed, smollm2_base
from qmerge.verbs.compress import release_freed_memory

ROOT = Path(__file__).resolve().parent


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def merged_model(base: Path, pack: Path, task: str):
    from transformers import AutoModelForCausalLM

    pk = qmerge.open_pack(pack)
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    state = m.state_dict()
    with torch.no_grad():
        for name in pk.entries(task):
            if name in state:
                state[name] += (
                    qmerge.residual(pk, task, name).dequantize().reshape(state[name].shape)
                )
    m.load_state_dict(state)
    return m


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, a dragon",
    "The three laws of motion are",
    "To bake bread, first",
    "In 1969, astronauts",
    "My favourite programming language is",
    "The best way to learn",
]


def smollm_tasks() -> dict[str, Path]:
    """Two short real fine-tunes (causal LM on fortunes and on WordNet glosses,
    bench/quality/finetune_lm.py) and three synthetic ones (base + 1% RMS noise)."""
    from bench.quality import finetune_lm

    base = smollm2_base()
    fts = {
        "fortunes": finetune_lm.finetune_lm("fortune_topic"),
        "glosses": finetune_lm.finetune_lm("noun_sense"),
    }
    fts |= {f"noise{i}": perturbed(base, f"smollm2-ft{i}", i) for i in range(3)}
    return fts


def smollm(log, new_tokens: int) -> None:
    from transformers import AutoTokenizer

    base = smollm2_base()
    fts = smollm_tasks()
    pack = CACHE / "pack-smollm2-5"
    if not (pack / "manifest.json").exists() or sorted(
        json.loads((pack / "manifest.json").read_text())["tasks"]
    ) != sorted(fts):
        qmerge.compress(base, fts, pack, overwrite=True)
    tok = AutoTokenizer.from_pretrained(base)
    ids = [tok(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    n = min(len(x) for x in ids)
    prompt = torch.stack([x[:n] for x in ids])  # equal lengths: no padding in the batch
    names = list(fts)
    route = [names[i % len(names)] for i in range(len(PROMPTS))]
    model = qmerge.load(base, pack)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            task=route,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
        t_gen = time.perf_counter() - t0
        base_out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    same = differs_from_base = 0
    rows = []
    for t in sorted(set(route)):
        ref_model = merged_model(base, pack, t)
        for i in [k for k, r in enumerate(route) if r == t]:
            with torch.no_grad():
                ref = ref_model.generate(
                    prompt[i : i + 1],
                    attention_mask=torch.ones_like(prompt[i : i + 1]),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )[0]
            ok = out[i, : len(ref)].tolist() == ref.tolist()
            same += ok
            differs_from_base += out[i].tolist() != base_out[i].tolist()
            rows.append((i, t, ok, tok.decode(out[i, n:], skip_special_tokens=True)))
        del ref_model
        gc.collect()
    log(
        f"### One `generate` over a mixed batch ({len(PROMPTS)} prompts of {n} tokens, tasks "
        f"{', '.join(sorted(set(route)))}, {new_tokens} new tokens, greedy, KV cache)"
    )
    log()
    log(
        f"- identical to the task's own merged model generating alone: **{same}/{len(rows)}** "
        f"({'PASS' if same == len(rows) else 'FAIL'})"
    )
    log(
        f"- sequences whose tokens differ from the bare base's: {differs_from_base}/{len(rows)} "
        f"(the synthetic tasks are small perturbations; the real ones were trained 40 steps)"
    )
    log(f"- wall time of the routed generate: {t_gen:.1f} s")
    log()
    log("| # | task | same tokens | continuation |")
    log("|---|---|---|---|")
    for i, t, ok, text in rows:
        log(f"| {i} | {t} | {'yes' if ok else 'NO'} | {' '.join(text.split())[:70]!r} |")
    log()


def child(mode: str) -> None:
    """Loads one configuration, runs a forward, prints its resident memory as JSON."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    base = smollm2_base()
    pack = CACHE / "pack-smollm2-5"
    prompt = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2, 3, 4, 5, 6, 7]] * 5)
    big = prompt.repeat(2, 8)  # 10 x 96 tokens: a uniform batch large enough to materialize
    extra = {}
    with torch.no_grad():  # every configuration runs the same two batches
        if mode == "base":
            m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
            m(input_ids=prompt)
            m(input_ids=big)
        elif mode == "routed":
            m = qmerge.load(base, pack, cache_bytes=64 << 20)
            m(input_ids=prompt, task=m.qmerge.tasks)  # fused, mixed: one row per task
            m(input_ids=big, task="fortunes")  # materialized, cached
            extra = m.qmerge.resident_bytes() | {"cache": m.qmerge.runtime.cache.stats()}
        else:
            ms = [
                AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                for path in smollm_tasks().values()
            ]
            for i, m in enumerate(ms):
                m(input_ids=prompt[i : i + 1])
            ms[0](input_ids=big)
    release_freed_memory()  # freed activations are not what serving costs
    gc.collect()
    print(
        json.dumps(
            {
                "mode": mode,
                "rss": status_bytes("VmRSS"),
                "rss_anon": status_bytes("RssAnon"),
                "rss_file": status_bytes("RssFile"),
                "hwm": status_bytes("VmHWM"),
            }
            | extra
        )
    )


def memory(log) -> None:
    res = {}
    for mode in ("base", "routed", "separate"):
        p = subprocess.run(
            [sys.executable, "-m", "bench.routing_llm", "--child", mode],
            capture_output=True,
            text=True,
            cwd=ROOT.parent,  # the repository root, where the bench package is importable
        )
        if p.returncode:
            raise SystemExit(f"child {mode} failed: {p.stderr[-2000:]}")
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    pack_bytes = qmerge.inspect(CACHE / "pack-smollm2-5")["pack_bytes"]
    r = res["routed"]
    mb = lambda b: f"{b / 1e6:.0f}"  # noqa: E731
    log(
        "### Resident memory of serving 5 tasks (SmolLM2-135M fp32, each row a fresh process "
        "after loading and a forward)"
    )
    log()
    log("| configuration | RSS (MB) | anonymous (MB) | file-backed (MB) | peak RSS (MB) |")
    log("|---|---|---|---|---|")
    for mode, name in [
        ("base", "base model alone"),
        ("routed", "base + 5-task pack, after a mixed and a cached batch"),
        ("separate", "5 separate fine-tuned models"),
    ]:
        x = res[mode]
        log(
            f"| {name} | {mb(x['rss'])} | {mb(x['rss_anon'])} | {mb(x['rss_file'])} | "
            f"{mb(x['hwm'])} |"
        )
    log()
    over = r["rss"] - res["base"]["rss"]
    held = r["residuals"] + r["vectors_and_heads"] + r["cache"]["bytes"]
    log(
        f"Routed minus base: {mb(over)} MB. What qmerge holds: residual banks "
        f"{mb(r['residuals'])} MB + dense vectors {mb(r['vectors_and_heads'])} MB (pack on "
        f"disk: {mb(pack_bytes)} MB) + merged-weight cache {mb(r['cache']['bytes'])} MB "
        f"(bound {mb(r['cache']['max_bytes'])} MB) = {mb(held)} MB; the rest "
        f"({mb(over - held)} MB) is what the allocator keeps of the batches' activations and "
        f"the rebuilt weights too big for the cache (the 113 MB fp32 embedding). 5 separate "
        f"models: {res['separate']['rss'] / r['rss']:.1f}x the routed process."
    )
    log()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        raise SystemExit("run bench/routing.py; this file is its SmolLM2 part")
    child(sys.argv[2])
