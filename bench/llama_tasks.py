"""Several qmerge tasks answered by ONE llama.cpp process: the base GGUF loaded once, each
task's GGUF LoRA (qmerge export --format gguf-lora) loaded beside it, and every request run
with its own adapter scales (llama_set_adapters_lora), a mixture as two scales at once.

Runs in the llama.cpp environment (no torch, no qmerge), called by bench/export_gguf.py:

    python bench/llama_tasks.py SPEC.json OUT.json

SPEC: {"base": GGUF, "adapters": {task: GGUF}, "requests": [{"ids": [...], "scales":
{task: s}, "new_tokens": n, "ref": [the routed model's greedy tokens]}], "eos": [...],
"threads": 2, "models": {label: GGUF}}. OUT: per request the greedy tokens and, along "ref",
whether each next token is predicted (teacher-forced, as the export checks measure); the decode
speed (tokens/s, prompt included) of the whole run, of the bare base, and of each merged GGUF
in "models", on the same prompts.
"""

import ctypes
import json
import sys
import time
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

# the export check's greedy decoding (a standalone script; this one runs without qmerge too)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qmerge" / "verbs" / "export"))
from _child_llama import greedy, logits  # noqa: E402


def main():
    spec = json.loads(open(sys.argv[1]).read())
    llm = Llama(
        model_path=spec["base"], n_ctx=256, logits_all=True, verbose=False,
        n_threads=spec.get("threads", 2), seed=0,
    )  # fmt: skip
    names = list(spec["adapters"])
    handles = []
    for t in names:
        h = llama_cpp.llama_adapter_lora_init(llm.model, spec["adapters"][t].encode())
        if not h:
            raise SystemExit(f"llama.cpp could not load the adapter of {t}")
        handles.append(h)
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
    eos = set(spec["eos"])

    def use(scales):
        s = (ctypes.c_float * len(names))(*[float(scales.get(t, 0.0)) for t in names])
        if llama_cpp.llama_set_adapters_lora(llm.ctx, arr, len(names), s):
            raise SystemExit("llama_set_adapters_lora failed")

    out, tokens, t0 = [], 0, time.perf_counter()
    for r in spec["requests"]:
        use(r["scales"])
        got = greedy(llm, r["ids"], r["new_tokens"], eos).tolist()
        tokens += len(got)
        out.append(got)
    adapted = time.perf_counter() - t0
    # teacher-forced, as the export checks measure: along the routed model's continuation
    # ("ref"), does llama.cpp with this request's adapter scales predict each next token?
    forced = []
    for r in spec["requests"]:
        use(r["scales"])
        ref, p = r.get("ref", []), len(r["ids"])
        pred = logits(llm, r["ids"] + ref)[p - 1 : p - 1 + len(ref)].argmax(-1).tolist()
        forced.append([int(a == b) for a, b in zip(pred, ref, strict=True)])
    use({})
    t0, base_tokens = time.perf_counter(), 0
    for r in spec["requests"]:
        base_tokens += len(greedy(llm, r["ids"], r["new_tokens"], eos))
    bare = time.perf_counter() - t0
    merged = {}
    for label, path in spec.get("models", {}).items():  # merged GGUF exports, same prompts
        m = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False,
                  n_threads=spec.get("threads", 2), seed=0)  # fmt: skip
        t0, n = time.perf_counter(), 0
        for r in spec["requests"]:
            n += len(greedy(m, r["ids"], r["new_tokens"], eos))
        merged[label] = n / (time.perf_counter() - t0)
        del m
    json.dump(
        {
            "greedy": out,
            "forced": forced,
            "tokens_per_s": tokens / adapted,
            "base_tokens_per_s": base_tokens / bare,
            "merged_tokens_per_s": merged,
            "adapters": names,
        },
        open(sys.argv[2], "w"),
    )


if __name__ == "__main__":
    main()
