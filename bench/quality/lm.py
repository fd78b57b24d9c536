"""The LLM track: SmolLM2-135M taught to answer each task's label word after a prompt
(finetune_lm.finetune_answers), scored by exact match of its greedy answer.

Exact match is read off one teacher-forced forward: greedy decoding produces the answer's
tokens and then end-of-sequence exactly when, fed the prompt and the answer, the model's
argmax at every answer position is the next answer token (each greedy step then sees the
same prefix as the forced one). That is the greedy answer's exact match at the cost of one
forward instead of one per token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import qmerge
from bench.quality.finetune_lm import CUES, answer_prompt, answer_word
from bench.quality.measure import Track, swapped, track_setups


class LM(Track):
    calib_max_length = 1024  # encode() does not truncate

    def __init__(
        self,
        base: Path,
        fts: dict[str, Path],
        tasks: dict,
        work: Path,
        seed: int,
        max_test: int,
        n_val: int = 40,
        router_examples: int = 128,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(base, fts, tasks, work, seed, max_test, n_val, router_examples)
        self.tok = AutoTokenizer.from_pretrained(base)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def prompt(self, task: str, text: str) -> str:
        return answer_prompt(text, CUES.get(task, "Answer"))

    def encode(self, texts):
        self.tok.padding_side = "right"
        return dict(self.tok(list(texts), padding=True, return_tensors="pt"))

    def batches(self, task: str, split: str = "test", bs: int = 32):
        """(input_ids, attention_mask, answer start per row, answer ids per row): prompt and
        answer tokenized apart (as in training), the answer ending in end-of-sequence."""
        data = self.split[split][task]
        labels = self.tasks[task].labels
        eos = self.tok.eos_token_id
        for i in range(0, len(data), bs):
            rows = []
            for text, y in data[i : i + bs]:
                p = self.tok(self.prompt(task, text))["input_ids"]
                a = self.tok(f" {answer_word(task, labels[y])}")["input_ids"] + [eos]
                rows.append((p, a))
            n = max(len(p) + len(a) for p, a in rows)
            ids = torch.full((len(rows), n), eos)
            mask = torch.zeros((len(rows), n), dtype=torch.long)
            for k, (p, a) in enumerate(rows):
                ids[k, : len(p) + len(a)] = torch.tensor(p + a)
                mask[k, : len(p) + len(a)] = 1
            yield ids, mask, [len(p) for p, _ in rows], [a for _, a in rows]

    @staticmethod
    def matches(logits: torch.Tensor, starts: list[int], answers: list[list[int]]) -> int:
        right = 0
        for k, (s, a) in enumerate(zip(starts, answers, strict=True)):
            greedy = logits[k, s - 1 : s - 1 + len(a)].argmax(-1)
            right += int(greedy.tolist() == a)
        return right

    def exact_match(self, forward: Callable, task: str, split: str = "test") -> float:
        right = n = 0
        with torch.no_grad():
            for ids, mask, starts, answers in self.batches(task, split):
                right += self.matches(forward(ids, mask, task).logits, starts, answers)
                n += len(answers)
        return right / n

    def finetuned(self, t: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.fts[t], dtype=torch.float32).eval()

    def score_model(self, model_for: Callable[[str], torch.nn.Module]) -> dict[str, float]:
        out = {}
        for t in self.names:
            m = model_for(t)
            out[t] = self.exact_match(
                lambda ids, mask, _t, m=m: m(input_ids=ids, attention_mask=mask), t
            )
        return out

    def base_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def score_state(self, state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        with swapped(self.model, state):
            return {
                t: self.exact_match(
                    lambda ids, mask, _t: self.model(input_ids=ids, attention_mask=mask), t, split
                )
                for t in self.names
            }

    def calib_texts(self, t: str, n: int = 32) -> list[str]:
        """The prompts the calibrated pack's scales are fitted on: n training prompts."""
        return [self.prompt(t, x) for x, _ in self.tasks[t].train[:n]]

    def score_pack(
        self, pack: Path, route: str, preds: dict[str, list[str]] | None = None
    ) -> dict[str, float]:
        model = qmerge.load(self.base, pack)
        out = {}
        try:
            for t in self.names:
                done = 0

                def forward(ids, mask, task):
                    nonlocal done
                    if route == "router":
                        assert preds is not None
                        which = preds[task][done : done + len(ids)]
                    else:
                        which = [task if route == "oracle" else "base"] * len(ids)
                    done += len(ids)
                    return model(input_ids=ids, attention_mask=mask, task=which)

                out[t] = self.exact_match(forward, t)
        finally:
            qmerge.unload(model)
        return out


def setups(s, log) -> tuple[list[dict], dict]:
    """Every setup of one seed: (rows, the static merges' sweeps)."""
    return track_setups(s, log, "base (floor)", lambda _t: s.model)
