"""One generation in flight: its tokens, how the next one is chosen, when it stops, and the
text it has released so far.

Text is released incrementally but never ahead of what is final: a trailing U+FFFD (a
character whose bytes are not all generated yet) and any tail that could still become a stop
string are held back until the next token decides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def greedy_rows(logits: Tensor) -> list[int]:
    """Each row's argmax, NaN never chosen: `choose` at temperature 0, for a batch [B, V] in
    one pass instead of one per row."""
    return torch.nan_to_num(logits.float(), nan=-torch.inf).argmax(-1).tolist()


def choose(logits: Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """The next token from one row of logits: argmax at temperature 0, else a sample from the
    tempered distribution cut to its top-p nucleus."""
    z = torch.nan_to_num(logits.double(), nan=-torch.inf)  # a NaN is never chosen
    if s.temperature == 0 or not bool(torch.isfinite(z).any()):
        return greedy_rows(logits[None])[0]
    # shifted by the max first, so a tiny temperature sends the rest to -inf (greedy, its
    # limit) instead of overflowing to inf - inf = NaN
    p = torch.softmax((z - z.max()) / s.temperature, -1)
    if not bool(torch.isfinite(p).all()):
        return int(z.argmax())
    if s.top_p < 1:
        sp, idx = torch.sort(p, descending=True)
        keep = (sp.cumsum(-1) - sp) < s.top_p  # always keeps the most likely token
        p = torch.zeros_like(p).scatter_(0, idx[keep], sp[keep])
    return int(torch.multinomial(p.float(), 1, generator=gen))


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    route: object  # a task name, 'base', or a mixture dict
    sampling: Sampling
    eos: frozenset[int]
    decode: object  # ids -> text (the tokenizer's decode, special tokens skipped)
    limit: int  # the model's context length
    tokens: list[int] = field(default_factory=list)
    released: int = 0  # characters of text already handed out
    finish: str | None = None  # 'stop' | 'length' once done
    text: str = ""
    gen: torch.Generator | None = None

    def __post_init__(self):
        self.gen = self.sampling.generator()

    def push(self, logits: Tensor, greedy: int | None = None) -> str:
        """Takes the next token from `logits`; returns the newly released text (maybe '').
        `greedy`: the row's argmax, when the caller took it for a whole batch at once (what
        `choose` returns at temperature 0)."""
        if greedy is not None and self.sampling.temperature == 0:
            tok = greedy
        else:
            tok = choose(logits, self.sampling, self.gen)
        if tok in self.eos:
            self.finish = "stop"
            return self._release(final=True)
        self.tokens.append(tok)
        self.text = str(self.decode(self.tokens))
        for stop in self.sampling.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.finish = "stop"
                return self._release(final=True)
        if (
            len(self.tokens) >= self.sampling.max_tokens
            or len(self.prompt) + len(self.tokens) >= self.limit
        ):
            self.finish = "length"
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            end -= _held(self.text[:end], self.sampling.stop)
        out = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return out

    @property
    def last(self) -> int:
        return self.tokens[-1] if self.tokens else self.prompt[-1]


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
