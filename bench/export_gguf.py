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
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "spec.json").write_text(json.dumps(spec))
        script = Path(__file__).with_name("llama_tasks.py")
        subprocess.run(
            [llama_python(), str(script), f"{d}/spec.json", f"{d}/out.json"],
            check=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        got = json.loads((Path(d) / "out.json").read_text())
    ref, routed_tps = routed_answers(base, lr, requests, eos)
    kinds: dict[str, list[int]] = {}
    agree = total = 0
    for r, a, b in zip(requests, got["greedy"], ref, strict=True):
        key = "+".join(f"{t}:{s:g}" for t, s in r["scales"].items())
        same = a == b
        kinds.setdefault(key, [0, 0])
        kinds[key][0] += same
        kinds[key][1] += 1
        # next-token agreement along the routed continuation is the export checks' measure;
        # here, position by position up to the first difference and counted over the rest
        n = min(len(a), len(b))
        agree += sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
        total += max(len(a), len(b))
    return {
        "requests": len(requests),
        "identical": kinds,
        "token_agreement": agree / total if total else 1.0,
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
    lines += ["", "Notes:", ""] + notes(mine, two)
    return "\n".join(lines) + "\n"


def notes(rows: list, two: dict) -> list[str]:
    out = []
    for r in rows:
        w, c = r["written"], r["check"]
        if r["format"] == "gguf":
            out.append(
                f"- gguf {w['gguf_type']} ({c['runtime']}): tensor types {w['types']}; "
                f"tokenizer {w['tokenizer']['model']}/{w['tokenizer'].get('pre')}, llama.cpp's "
                f"tokenization equals the base tokenizer's on {c.get('tokenizer_identical')} "
                f"check texts."
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
    out.append(
        f"- One llama.cpp process, base GGUF + both adapters loaded once, {two['requests']} "
        f"requests interleaving fortunes, glosses and their 50/50 mixture (scales per request): "
        f"greedy answers identical to the routed low-rank model {two['identical']}, "
        f"{two['token_agreement']:.2%} of tokens. Decode: llama.cpp with adapters "
        f"{two['llama_tps']:.1f} tokens/s, llama.cpp bare base {two['llama_base_tps']:.1f}, "
        f"qmerge's routed model (transformers generate, batch 1) {two['routed_tps']:.1f}; "
        f"merged GGUF exports of fortunes: "
        + ", ".join(f"{k} {v:.1f}" for k, v in two["merged_tps"].items())
        + " (tokens/s, prompt processing included, 2 threads)."
    )
    return out
