"""Runs a GGUF export in llama.cpp (llama-cpp-python), in a fresh process that cannot import
qmerge, and writes its outputs for `check.py`, in the same form as `_child.py`:

    python _child_llama.py SPEC.json

`out.{i}`: the logits from the last prompt position on of the full sequence `seq.{i}`;
`greedy.{i}`: the tokens llama.cpp's greedy decoding appends to the prompt; for texts,
`tokenizer_identical`: [inputs whose llama.cpp tokenization equals the base tokenizer's,
inputs]. Needs only numpy, safetensors and llama_cpp (an environment without torch works).
"""

import json
import sys
from pathlib import Path

import _isolate  # noqa: F401  (first: blocks qmerge, drops this directory from sys.path)
import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file, save_file


def load(spec, n_ctx):
    d = Path(spec["dir"])
    common = dict(n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    if spec["format"] == "gguf":
        return Llama(model_path=str(d / "model.gguf"), **common)
    return Llama(model_path=spec["base_gguf"], lora_path=str(d / "adapter.gguf"), **common)


def logits(llm, ids):
    llm.reset()
    llm.eval([int(x) for x in ids])
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, prompt, n, eos):
    llm.reset()
    llm.eval([int(x) for x in prompt])
    new = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(nxt)
        if nxt in eos:
            break
        llm.eval([nxt])
    return np.array(new, dtype=np.int64)


def same_tokens(llm, text, ids):
    got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    ids = [int(x) for x in ids]
    if ids and got[:1] != ids[:1] and ids[0] == llm.token_bos():
        ids = ids[1:]  # the base tokenizer added BOS; compare the text's tokens
    return got == ids


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    inputs = load_file(spec["inputs"])
    count = spec["count"]
    longest = max(inputs[f"seq.{i}"].shape[0] for i in range(count))
    llm = load(spec, max(64, longest + 8))
    results = {}
    for i in range(count):
        seq = inputs[f"seq.{i}"]
        p = int(inputs[f"prompt.{i}"])
        results[f"out.{i}"] = np.ascontiguousarray(logits(llm, seq)[p - 1 :])
        results[f"greedy.{i}"] = greedy(llm, seq[:p], seq.shape[0] - p, set(spec["eos"]))
    texts = spec.get("texts")
    if texts:
        same = sum(
            same_tokens(llm, t, inputs[f"seq.{i}"][: int(inputs[f"prompt.{i}"])])
            for i, t in enumerate(texts[:count])
        )
        results["tokenizer_identical"] = np.array([same, min(len(texts), count)], dtype=np.int64)
    save_file(results, spec["output"])


if __name__ == "__main__":
    main()
