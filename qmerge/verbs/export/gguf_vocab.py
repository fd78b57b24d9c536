"""The tokenizer of a GGUF export, from the base directory's `tokenizer.json`: the tokens in id
order with their types, the BPE merges, the special token ids, the chat template, and the
pre-tokenizer llama.cpp applies (`tokenizer.ggml.pre`).

Supported: byte-level BPE tokenizers (GPT-2 style, which Llama-3, SmolLM, Qwen and most recent
causal LMs use). llama.cpp names its pre-tokenizers; this module recognises the splits it can
tell from `tokenizer.json` alone and says so when it cannot (the report carries `pre` and a
warning; the bench compares llama.cpp's tokenization with the base tokenizer's).

A base without a tokenizer (a test model) gets `tokenizer.ggml.model = "none"`: llama.cpp
loads it and runs token ids, as the export's check does.
"""

from __future__ import annotations

import json
from pathlib import Path

from qmerge.errors import ExportError
from qmerge.verbs.export.gguf_arch import gguf

# Llama-3's split (also used by several later models); the exact pattern in tokenizer.json
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None if not recognised."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
            return "llama-bpe"
    return None


def add(writer, base: Path, vocab_size: int) -> dict:
    """Writes the tokenizer keys; returns what the report says of them."""
    g = gguf()
    path = base / "tokenizer.json"
    if not path.exists():
        writer.add_tokenizer_model("none")
        return {"model": "none", "note": "the base has no tokenizer.json; token ids only"}
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not readable as JSON ({e})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"{path}: GGUF export supports byte-level BPE tokenizers; this one is "
            f"{model.get('type')!r}{' with byte fallback' if model.get('byte_fallback') else ''}"
        )
    tokens, types = _tokens(model.get("vocab", {}), tok.get("added_tokens", []), vocab_size)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer(tok.get("pre_tokenizer"))
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = g.SpecialVocab(base, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    info = {"model": "gpt2", "pre": pre or "default", "tokens": len(tokens)}
    info["merges"] = len(special.merges)
    if pre is None:
        info["warning"] = (
            "llama.cpp's pre-tokenizer for this tokenizer.json was not recognised; "
            "'default' written: text may split differently from the base tokenizer"
        )
    return info


def _tokens(vocab: dict, added: list, vocab_size: int) -> tuple[list[str], list[int]]:
    kind = gguf().TokenType
    by_id: dict[int, tuple[str, int]] = {i: (t, kind.NORMAL) for t, i in vocab.items()}
    for a in added:
        by_id[int(a["id"])] = (
            a["content"],
            kind.CONTROL if a.get("special") else kind.USER_DEFINED,
        )
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens, types = [], []
    for i in range(size):
        t, k = by_id.get(i, (f"[PAD{i}]", kind.UNUSED))
        tokens.append(t)
        types.append(int(k))
    if size > vocab_size:
        raise ExportError(
            f"the tokenizer has {size} tokens, the model's embedding {vocab_size} rows"
        )
    return tokens, types
