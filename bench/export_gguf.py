"""The llama.cpp and vLLM hand-offs of bench/export.py, on SmolLM2-135M tasks:

- `gguf` of the fortunes task of the 5-task sign pack at f16, q8_0 (output layer f16), pure
  q8_0 and q4_0 (output layer q8_0), each checked in llama.cpp on 48 held-out fortune
  openings (16 greedy tokens each);
- `gguf-lora` of the two real fine-tunes of the low-rank pack (rank 16), checked in llama.cpp
  over the base GGUF (written by the first export, reused by the second);
- both adapters served by ONE llama.cpp process with per-request adapter scales
  (bench/llama_tasks.py), requests of both tasks and their 50/50 mixture interleaved, against
  the routed model's greedy answers; tokens/s next to the routed model's and the bare base's;
- `peft --target vllm` of the same tasks (rank from vLLM's set, no modules_to_save) and of the
  sign pack (SVD at rank 16), reloaded by PEFT.

llama.cpp comes from `llama-cpp-python` built from source into bench/.cache/llama-venv on the
first run (a few minutes on 2 cores); QMERGE_LLAMA_PYTHON points the export checks at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qmerge
from bench.common import CACHE
from qmerge.verbs.export.adapter import VLLM_RANKS

VENV = CACHE / "llama-venv"
LLAMA_CPP = "llama-cpp-python==0.3.36"
TASKS = ("fortunes", "glosses")


def llama_python() -> str:
    """The llama.cpp environment's Python, built on first use."""
    py = VENV / "bin" / "python"
    ok = py.exists() and not subprocess.run([py, "-c", "import llama_cpp, safetensors"]).returncode
    if not ok:
        print(f"building {LLAMA_CPP} into {VENV} (a few minutes)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python", LLAMA_CPP]
            + ["safetensors", "numpy"],
            check=True,
            env=env,
        )
    os.environ["QMERGE_LLAMA_PYTHON"] = str(py)
    return str(py)


def routed_answers(base: Path, pack: Path, requests: list[dict], eos: list[int]) -> tuple:
    """The routed model's greedy tokens for each request, and its decode tokens/s."""
    from transformers import GenerationConfig

    model = qmerge.load(base, pack, dtype=torch.float32)
    out, tokens, t0 = [], 0, time.perf_counter()
    for r in requests:
        ids = torch.tensor([r["ids"]])
        route = (
            {"task": next(iter(r["scales"]))}
            if len(r["scales"]) == 1
            else {"coeffs": dict(r["scales"])}
        )
        cfg = GenerationConfig(
            max_new_tokens=r["new_tokens"], do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
        with torch.no_grad():
            g = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg, **route
            )
        new = g[0, ids.shape[1] :].tolist()
        tokens += len(new)
        out.append(new)
    return out, tokens / (time.perf_counter() - t0)


def one_process(
    base: Path, lr: Path, exports: dict[str, Path], prompts: list[str], models: dict[str, str]
) -> dict:
    """Both tasks' adapters (and their mixture) served by one llama.cpp process."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    eos = [int(tok.eos_token_id)]
    mixes = [{"fortunes": 1.0}, {"glosses": 1.0}, {"fortunes": 0.5, "glosses": 0.5}]
    requests = [
        {"ids": tok(p)["input_ids"], "scales": mixes[i % 3], "new_tokens": 16}
        for i, p in enumerate(prompts)
    ]
    spec = {
        "base": str(exports["fortunes"] / "base.gguf"),
        "adapters": {t: str(exports[t] / "adapter.gguf") for t in TASKS},
        "requests": requests,
        "eos": eos,
        "models": models,
    }
    ref, routed_tps = routed_answers(base, lr, requests, eos)
    for r, answer in zip(requests, ref, strict=True):
        r["ref"] = answer
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "spec.json").write_text(json.dumps(spec))
        script = Path(__file__).with_name("llama_tasks.py")
        subprocess.run(
            [llama_python(), str(script), f"{d}/spec.json", f"{d}/out.json"],
            check=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        got = json.loads((Path(d) / "out.json").read_text())
    kinds: dict[str, dict] = {}
    for r, a, b, f in zip(requests, got["greedy"], ref, got["forced"], strict=True):
        k = kinds.setdefault(
            "+".join(f"{t}:{s:g}" for t, s in r["scales"].items()),
            {"identical": 0, "requests": 0, "agree": 0, "tokens": 0},
        )
        k["identical"] += a == b
        k["requests"] += 1
        k["agree"] += sum(f)
        k["tokens"] += len(f)
    return {
        "requests": len(requests),
        "kinds": kinds,
        "llama_tps": got["tokens_per_s"],
        "llama_base_tps": got["base_tokens_per_s"],
        "merged_tps": got["merged_tokens_per_s"],
        "routed_tps": routed_tps,
    }


def track(rows: list, run, base: Path, pack: Path, lr: Path, held: list[str]) -> dict:
    """Adds the GGUF and vLLM rows to `rows` (bench/export.py's `run`); returns the
    one-process result."""
    llama_python()
    free = dict(texts=held, check_inputs=len(held), new_tokens=16)
    models = {}
    # q8_0 keeps the output layer (the tied embedding) in f16 by default; the pure q8_0 file
    # (every matrix q8_0, llama.cpp's converter's --outtype q8_0) is measured beside it
    for gt in ("f16", "q8_0", "q8_0:output=q8_0", "q4_0"):
        # q4_0 is reported, not held to the 0.9 default: 4 bits per weight (32-blocks, no
        # importance matrix) on a 135M model is a lossy deployment choice users make knowingly
        floor = {"min_agreement": 0.5} if gt == "q4_0" else {}
        label = "fortunes-" + gt.replace(":output=", "-output-")
        r = run(rows, "SmolLM2", pack, base, "gguf", label, task="fortunes", gguf_type=gt,
                **free, **floor)  # fmt: skip
        models[gt] = str(Path(r["out"]) / "model.gguf")
    # where the pure q8_0 file loses agreement: the same file with its weights dequantized
    # and run in fp32 (transformers' GGUF loader) separates weight rounding from llama.cpp's
    # own q8_0 arithmetic (it rounds the activations to 8 bits per 32-block too)
    llama = os.environ.pop("QMERGE_LLAMA_PYTHON")
    try:
        run(rows, "SmolLM2", pack, base, "gguf", "fortunes-q8_0-output-q8_0-dequantized",
            task="fortunes", gguf_type="q8_0:output=q8_0", **free)  # fmt: skip
    finally:
        os.environ["QMERGE_LLAMA_PYTHON"] = llama
    few = dict(texts=held[:16], check_inputs=16, new_tokens=16)
    exports = {}
    for t in TASKS:
        kw = {"gguf_base": exports["fortunes"] / "base.gguf"} if exports else {}
        r = run(rows, "SmolLM2", lr, base, "gguf-lora", t, task=t, gguf_type="f16", **few, **kw)
        exports[t] = Path(r["out"])
    two = one_process(base, lr, exports, held[:24], models)
    for t in TASKS:
        run(rows, "SmolLM2", lr, base, "peft", f"{t}-vllm", task=t, target="vllm", **few)
    run(rows, "SmolLM2", pack, base, "peft", "fortunes-vllm-svd16", task="fortunes",
        target="vllm", rank=16, min_agreement=0.5, **few)  # fmt: skip
    return two


HEADER = "## llama.cpp (GGUF) and vLLM hand-offs"


def section(rows: list, two: dict, argv: str) -> str:
    """The results section of these rows (bench/results/export.md)."""
    mine = [r for r in rows if r["format"].startswith("gguf") or r["label"].endswith(
        ("vllm", "vllm-svd16"))]  # fmt: skip
    lines = [
        HEADER,
        "",
        f"Command: `{argv}` (this section; llama.cpp {LLAMA_CPP} built from source by the "
        f"bench). Each row is one `qmerge export`, checked in a fresh process without qmerge "
        f"by the runtime named (llama.cpp through llama-cpp-python; PEFT for the vLLM "
        f"adapter), teacher-forced next-token agreement along the routed model's greedy "
        f"continuation, as above.",
        "",
        "| format | type | pack | selection | runtime | inputs | max rel | agreement | greedy "
        "| export MiB | energy left out | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mine:
        c, w = r["check"], r["written"]
        kind = f"rank {w.get('rank')}"
        if w.get("gguf_type"):
            kind = w["gguf_type"] + (f", output {w['output_type']}" if "output_type" in w else "")
        left = w.get("energy_left_out")
        lines.append(
            f"| {r['format']}{' --target vllm' if w.get('target') else ''} | {kind} | "
            f"{r['pack_name']} | {r['selection']} | {c['runtime']} | {c['inputs']} | "
            f"{c['max_rel']:.2e} | {c['agreement']:.4f} ({c['compared']}) | "
            f"{c.get('greedy_identical', '-')} | {r['sizes']['export_bytes'] / 2**20:.1f} | "
            f"{'-' if left is None else f'{left:.2%}'} | {r['seconds']:.0f} |"
        )
    lines += ["", "Done-when (issue 27):", "", "| item | measured | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {'PASS' if ok else 'FAIL'} |" for a, b, ok in checks(mine, two)]
    lines += ["", "Notes:", ""] + notes(mine, two)
    return "\n".join(lines) + "\n"


def checks(rows: list, two: dict) -> list[tuple[str, str, bool]]:
    def row(label):
        return next(r for r in rows if r["label"] == label)

    def llama(r):
        return r["check"]["runtime"] == "llama.cpp"

    out = []
    for label, floor in (("fortunes-f16", 0.99), ("fortunes-q8_0", 0.95)):
        r = row(label)
        out.append(
            (
                f"gguf {label.split('-', 1)[1]} in llama.cpp: next-token agreement >= {floor}",
                f"{r['check']['agreement']:.2%} of {r['check']['compared']} "
                f"({r['check']['runtime']})",
                llama(r) and r["check"]["agreement"] >= floor,
            )
        )
    for t in TASKS:
        r = row(t)
        out.append(
            (
                f"gguf-lora {t} (f16) over the base GGUF in llama.cpp: agreement >= 0.95",
                f"{r['check']['agreement']:.2%} of {r['check']['compared']}",
                llama(r) and r["check"]["agreement"] >= 0.95,
            )
        )
    share = {k: v["agree"] / v["tokens"] for k, v in two["kinds"].items()}
    out.append(
        (
            "both tasks and their mixture answered by one llama.cpp process (base + 2 adapters, "
            "scales per request): agreement >= 0.95 each",
            ", ".join(f"{k} {v:.2%}" for k, v in share.items()),
            min(share.values()) >= 0.95,
        )
    )
    for r in (x for x in rows if x["written"].get("target") == "vllm"):
        w = r["written"]
        out.append(
            (
                f"vllm adapter {r['label']}: no modules_to_save, rank in vLLM's set, PEFT "
                f"reloads it, left-out energy reported",
                f"rank {w['rank']}, modules_to_save {w['modules_to_save'] or 'none'}, "
                f"PEFT check passed, {w['energy_left_out']:.2%} left out",
                not w["modules_to_save"] and w["rank"] in VLLM_RANKS and r["check"]["passed"],
            )
        )
    return out


def notes(rows: list, two: dict) -> list[str]:
    out = []
    for r in rows:
        w, c = r["written"], r["check"]
        if r["format"] == "gguf":
            out.append(
                f"- gguf {w['gguf_type']} ({c['runtime']}): tensor types {w['types']}; "
                f"tokenizer {w['tokenizer']['model']}/{w['tokenizer'].get('pre')}"
                + (
                    f", llama.cpp's tokenization equals the base tokenizer's on "
                    f"{c['tokenizer_identical']} check texts."
                    if c.get("tokenizer_identical")
                    else "."
                )
            )
        if r["format"] == "gguf-lora":
            out.append(
                f"- gguf-lora {r['label']} ({c['runtime']}): {w['lora_tensors']} LoRA pairs, "
                f"ranks {w['ranks']}; left out {len(w['left_out'])} tensor(s) "
                f"({', '.join(w['left_out'][:3])}), {w['energy_left_out']:.2%} of the task "
                f"vector's energy."
            )
        if r["format"] == "peft" and w.get("target") == "vllm":
            out.append(
                f"- peft --target vllm {r['label']}: rank {w['rank']}, modules_to_save none, "
                f"left out {len(w['left_out'])} tensor(s), {w['energy_left_out']:.2%} of the "
                f"task vector's energy; reloaded by PEFT: agreement {c['agreement']:.2%}."
            )
    by = {r["label"]: r for r in rows}
    pure, deq = by.get("fortunes-q8_0-output-q8_0"), by.get("fortunes-q8_0-output-q8_0-dequantized")
    q8 = by.get("fortunes-q8_0")
    if pure and deq and q8:
        out.append(
            f"- Where q8_0 loses agreement: the pure q8_0 file agrees on "
            f"{pure['check']['agreement']:.2%} in llama.cpp, the same file dequantized and run "
            f"in fp32 on {deq['check']['agreement']:.2%}: the rest is llama.cpp's q8_0 "
            f"arithmetic, which rounds each activation block of 32 to 8 bits as well. Keeping "
            f"the output layer (the tied embedding, the largest matrix, whose error goes "
            f"straight into the logits) in f16 gives {q8['check']['agreement']:.2%} "
            f"for {q8['sizes']['export_bytes'] / 2**20:.0f} MiB instead of "
            f"{pure['sizes']['export_bytes'] / 2**20:.0f}: the default. Every disagreement is a "
            f"near-tie of the routed model (top-two logits <= "
            f"{q8['check']['flip_margin_max']:.3f} apart), as for int8 and bf16 "
            f"above on the same free-text prompts."
        )
    vllm = [r for r in rows if r["written"].get("target") == "vllm" and "svd" not in r["label"]]
    lora = [r for r in rows if r["format"] == "gguf-lora"]
    if vllm and lora:
        least = min(r["written"]["energy_left_out"] for r in vllm)
        v_agree = ", ".join(f"{r['check']['agreement']:.1%}" for r in vllm)
        l_agree = ", ".join(f"{r['check']['agreement']:.1%}" for r in lora)
        out.append(
            f"- What the vLLM adapter leaves out: these real fine-tunes moved the (tied) "
            f"embedding most; it holds {least:.0%} or more of their task vectors' energy. The "
            f"vLLM adapter carries only the Linear layers (vLLM's LoRA on embeddings was tied "
            f"to its extra-vocabulary option, dropped in late 2025, and no vLLM runs here to "
            f"show a release that takes it), so PEFT reloading it agrees on "
            f"{v_agree}, where the llama.cpp adapters, which carry the embedding on both "
            f"sides, agree on {l_agree}. Such tasks are better served by qmerge or llama.cpp. "
            f"The vLLM adapters are checked by PEFT, not by vLLM (no vLLM build runs here)."
        )
    if lora and lora[0]["written"].get("base_written"):
        b = lora[0]["written"]["base_written"]
        out.append(
            f"- The first gguf-lora export's directory holds base.gguf too ({b['tensors']} "
            f"tensors, its output layer untied so that adapters can change it); the second "
            f"reuses it (--gguf-base) and is the adapter alone: "
            f"{lora[-1]['sizes']['export_bytes'] / 2**20:.1f} MiB."
        )
    q4 = next((r for r in rows if r["label"] == "fortunes-q4_0"), None)
    if q4:
        out.append(
            f"- q4_0 (4 bits per weight in blocks of 32, no importance matrix; output layer "
            f"q8_0) keeps {q4['check']['agreement']:.1%} on these near-tie free-text prompts: "
            f"reported, with no target; a 135M model has little redundancy to lose."
        )
    kinds = "; ".join(
        f"{k}: {v['agree'] / v['tokens']:.2%} of {v['tokens']} tokens, greedy answers "
        f"identical {v['identical']}/{v['requests']}"
        for k, v in two["kinds"].items()
    )
    out.append(
        f"- One llama.cpp process, base GGUF + both adapters loaded once, {two['requests']} "
        f"requests interleaving fortunes, glosses and their 50/50 mixture (adapter scales set "
        f"per request), against the routed low-rank model (next-token agreement along its "
        f"greedy continuation): {kinds}. Decode: llama.cpp with adapters "
        f"{two['llama_tps']:.1f} tokens/s, llama.cpp bare base {two['llama_base_tps']:.1f}, "
        f"qmerge's routed model (transformers generate, batch 1) {two['routed_tps']:.1f}; "
        f"merged GGUF exports of fortunes: "
        + ", ".join(f"{k} {v:.1f}" for k, v in two["merged_tps"].items())
        + " (tokens/s, prompt processing included, 2 threads)."
    )
    return out
