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

# Requests every server refuses with a 4xx and words of its message (limits: max_tokens=24).
BAD_REQUESTS = [
    ({"model": "nope", "prompt": "the cat"}, 404, "does not exist"),
    ({"model": "t0:0.5+zz:0.5", "prompt": "the cat"}, 404, "'zz' does not exist"),
    ({"model": "t0:x+t1:0.5", "prompt": "the cat"}, 400, "is not a number"),
    ({"model": "auto", "prompt": "the cat"}, 400, "has none"),
    ({"model": "t0", "prompt": "the cat", "max_tokens": 1000}, 400, "at most 24"),
    ({"model": "t0", "prompt": "the cat", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "t0", "prompt": "the cat", "stop": [""]}, 400, "non-empty"),
    ({"model": "t0", "prompt": "the cat", "temperature": -1}, 400, "temperature"),
    ({"model": "t0", "prompt": ""}, 400, "empty"),
    ({"model": "t0", "prompt": []}, 400, "at least one"),
    ({"model": "t0"}, 400, "prompt"),
    ({"prompt": "the cat"}, 400, "model"),
    # issue 30: hostile values are client errors, refused before any work
    ({"model": "t0:1e39", "prompt": "the cat"}, 400, "at most 1000"),
    ({"model": "t0:1e308+t0:1e308", "prompt": "the cat"}, 400, "at most 1000"),
    ({"model": "t0", "prompt": "cat " * 40_000}, 400, "characters"),
]


def complete(client, model: str, prompt, n: int = 12, **kw):
    return client.post(
        "/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **kw},
    )
