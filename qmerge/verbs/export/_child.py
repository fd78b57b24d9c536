"""Runs an exported artifact the way its users will, in a fresh process where qmerge cannot be
imported, and writes its outputs for `check.py` to compare with the routed model's.

    python _child.py SPEC.json

SPEC names the format, the export directory, the model kind, the inputs file (safetensors:
`seq.{i}` token ids [L], `prompt.{i}` the prompt length) and where to write the outputs
(`out.{i}`: a classifier's logits, an encoder's hidden states, a causal LM's logits from the
last prompt position on; `greedy.{i}`: for a causal LM, the tokens greedy decoding appends to
the prompt). This file imports only torch,
transformers, safetensors and the format's own runtime (peft, onnxruntime, the int8 loader).
"""

import json
import sys
from pathlib import Path

import _isolate  # noqa: F401  (first: blocks qmerge, drops this directory from sys.path)
import torch
from safetensors.torch import load_file, save_file


def _auto(spec):
    import transformers

    return getattr(transformers, spec["auto"])


def load_model(spec):
    fmt, d = spec["format"], Path(spec["dir"])
    if fmt == "hf":
        return _auto(spec).from_pretrained(d, dtype=torch.float32).eval()
    if fmt == "int8":
        sys.path.insert(0, str(d))
        import qmerge_int8

        return qmerge_int8.load(d).eval()
    if fmt == "gguf":
        return _auto(spec).from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32).eval()
    if fmt == "gguf-lora":
        base = Path(spec["base_gguf"])
        model = _auto(spec).from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
        return apply_gguf_lora(model.eval(), d / "adapter.gguf")
    if fmt == "peft":
        from peft import PeftModel

        kwargs = {"num_labels": spec["num_labels"]} if spec.get("num_labels") else {}
        base = _auto(spec).from_pretrained(spec["base"], dtype=torch.float32, **kwargs)
        return PeftModel.from_pretrained(base, d).eval()
    raise SystemExit(f"unknown format {fmt!r}")


def apply_gguf_lora(model, path):
    """Adds a llama.cpp LoRA adapter (read with the gguf package) to a transformers Llama:
    W += B A per adapted tensor, Q/K rows back in transformers' order, token_embd in
    llama.cpp's layout for embeddings (lora_a [vocab, r], lora_b [dim, r])."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    params = dict(model.named_parameters())
    by_gguf = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in params}
    parts = {}
    for t in gguf.GGUFReader(path).tensors:
        base, _, ab = t.name.rpartition(".")
        data = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        parts.setdefault(base, {})[ab] = data.reshape([int(x) for x in reversed(t.shape)])
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    with torch.no_grad():
        for base, ab in parts.items():
            hf = by_gguf[base]
            a, b = ab["lora_a"], ab["lora_b"]
            if hf.endswith("embed_tokens.weight"):
                d = a @ b.T
            else:
                proj = hf.split(".")[-2]
                if proj in heads:  # llama.cpp's interleaved rotary rows -> transformers'
                    n = heads[proj]
                    b = b.reshape(n, b.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(b.shape)
                d = b @ a
            params[hf].add_(d)
    return model


def output(spec, out):
    if spec["kind"] == "encoder":
        return out.last_hidden_state[0]
    return out.logits[0]


def scored(spec, out, inputs, i):
    """A causal LM's logits from the last prompt position on (the predictions of the
    continuation, and the one after it); other kinds' outputs whole."""
    if spec["kind"] != "causal-lm":
        return out
    return out[int(inputs[f"prompt.{i}"]) - 1 :].contiguous()


def greedy_generate(model, prompt, n, eos):
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=n,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    ids = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=cfg
    )
    return ids[0, prompt.shape[1] :]


def run_torch(spec, inputs, results):
    model = load_model(spec)
    with torch.no_grad():
        for i in range(spec["count"]):
            seq = inputs[f"seq.{i}"][None]
            out = output(spec, model(input_ids=seq, attention_mask=torch.ones_like(seq))).float()
            results[f"out.{i}"] = scored(spec, out, inputs, i)
            if spec["kind"] == "causal-lm":
                p = int(inputs[f"prompt.{i}"])
                n = seq.shape[1] - p
                results[f"greedy.{i}"] = (
                    greedy_generate(model, seq[:, :p], n, spec["eos"])
                    if n
                    else torch.zeros(0, dtype=torch.long)
                )


def run_onnx(spec, inputs, results):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(
        str(Path(spec["dir"]) / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def fwd(ids):
        return torch.from_numpy(
            sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        )

    for i in range(spec["count"]):
        seq = inputs[f"seq.{i}"][None].numpy()
        results[f"out.{i}"] = scored(spec, fwd(seq).float(), inputs, i)
        if spec["kind"] == "causal-lm":
            p = int(inputs[f"prompt.{i}"])
            ids, new = seq[:, :p], []
            for _ in range(seq.shape[1] - p):
                nxt = int(fwd(ids)[-1].argmax())
                new.append(nxt)
                ids = np.concatenate([ids, np.array([[nxt]], dtype=ids.dtype)], axis=1)
                if nxt in spec["eos"]:
                    break
            results[f"greedy.{i}"] = torch.tensor(new, dtype=torch.long)


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    inputs = load_file(spec["inputs"])
    results = {}
    if spec["format"] == "onnx":
        run_onnx(spec, inputs, results)
    else:
        run_torch(spec, inputs, results)
    save_file({k: v.contiguous() for k, v in results.items()}, spec["output"])


if __name__ == "__main__":
    main()
