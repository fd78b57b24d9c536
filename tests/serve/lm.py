"""What the HTTP server tests share: the tiny causal LM's tokens and prompts, and one
completion request."""

from __future__ import annotations

LM_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
PROMPTS = [
    "the cat sat on",
    "a dog ran",
    "red blue big",
    "the mat was very",
    "small cat is not",
    "slow and fast",
    "a big red dog sat on the",
    "is",
]


def complete(client, model: str, prompt, n: int = 12, **kw):
    return client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **kw},
    )
