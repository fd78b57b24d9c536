"""The MiniLM track: all-MiniLM-L6-v2 fine-tuned (whole encoder + a head) per task. Heads are
per task and kept out of every merge: every setup is scored with the task's own head on the
pooled output of the encoder that setup gives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import qmerge
from bench.quality.measure import Track, swapped, track_setups


class MiniLM(Track):
    heads = ("classifier.*",)
    calib_max_length = 64  # as encode() truncates

    def __init__(
        self,
        base: Path,
        fts: dict[str, Path],
        tasks: dict,
        work: Path,
        seed: int,
        max_test: int,
        n_val: int = 60,
        router_examples: int = 256,
    ):
        from transformers import AutoModel, AutoTokenizer

        super().__init__(base, fts, tasks, work, seed, max_test, n_val, router_examples)
        self.tok = AutoTokenizer.from_pretrained(base)
        self.encoder = AutoModel.from_pretrained(base).eval()
        self.head = {}
        for t in self.names:
            sd = self.finetuned(t).state_dict()
            self.head[t] = (sd["classifier.weight"].float(), sd["classifier.bias"].float())

    def encode(self, texts):
        return dict(
            self.tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        )

    def batches(self, task: str, split: str = "test", bs: int = 64):
        data = self.split[split][task]
        for i in range(0, len(data), bs):
            chunk = data[i : i + bs]
            yield self.encode([t for t, _ in chunk]), torch.tensor([y for _, y in chunk])

    def finetuned(self, t: str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.fts[t]).eval()

    def score_model(self, model_for: Callable[[str], torch.nn.Module]) -> dict[str, float]:
        """Accuracy per task of plain transformers classifiers (fine-tunes, floor)."""
        out = {}
        for t in self.names:
            m = model_for(t)
            right = n = 0
            with torch.no_grad():
                for enc, y in self.batches(t):
                    right += int((m(**enc).logits.argmax(-1) == y).sum())
                    n += len(y)
            out[t] = right / n
        return out

    def floor(self, t: str):
        m = self.finetuned(t)
        m.bert.load_state_dict(self.base_state())
        return m

    def base_state(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.base).state_dict()

    def score_state(self, state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Accuracy per task of the base encoder with `state`'s tensors, under each task's
        head."""
        out = {}
        with swapped(self.encoder, state), torch.no_grad():
            for t in self.names:
                w, b = self.head[t]
                right = n = 0
                for enc, y in self.batches(t, split):
                    pooled = self.encoder(**enc).pooler_output
                    right += int(((pooled @ w.T + b).argmax(-1) == y).sum())
                    n += len(y)
                out[t] = right / n
        return out

    def calib_texts(self, t: str, n: int = 64) -> list[str]:
        """The texts the calibrated pack's scales are fitted on: n training texts."""
        return [x for x, _ in self.tasks[t].train[:n]]

    def score_pack(
        self, pack: Path, route: str, preds: dict[str, list[str]] | None = None
    ) -> dict[str, float]:
        """Accuracy per task of a pack: the encoder routed by `route` ('oracle': the true
        task; 'base': the backbone alone, i.e. a static merge; 'router': `preds`), scored
        with the true task's head on the pooled output."""
        model = qmerge.load(self.base, pack)
        pk = qmerge.open_pack(pack)
        pooled: list[torch.Tensor] = []
        h = model.bert.pooler.register_forward_hook(lambda _m, _a, out: pooled.append(out))
        out = {}
        try:
            for t in self.names:
                head = pk.heads(t)
                w, b = head["classifier.weight"].float(), head["classifier.bias"].float()
                right = n = 0
                with torch.no_grad():
                    for i, (enc, y) in enumerate(self.batches(t)):
                        if route == "oracle":
                            groups = {t: list(range(len(y)))}
                        elif route == "base":
                            groups = {"base": list(range(len(y)))}
                        else:
                            assert preds is not None
                            groups = {}
                            for k, p in enumerate(preds[t][i * 64 : i * 64 + len(y)]):
                                groups.setdefault(p, []).append(k)
                        # one forward per routed task: the hook then sees rows in order
                        pooled_rows = torch.empty(len(y), w.shape[1])
                        for task, rows in groups.items():
                            idx = torch.tensor(rows)
                            pooled.clear()
                            model(**{k: v[idx] for k, v in enc.items()}, task=task)
                            pooled_rows[idx] = pooled[-1]
                        logits = pooled_rows @ w.T + b
                        right += int((logits.argmax(-1) == y).sum())
                        n += len(y)
                out[t] = right / n
        finally:
            h.remove()
            qmerge.unload(model)
        return out


def setups(s, log) -> tuple[list[dict], dict]:
    """Every setup of one seed: (rows, the static merges' sweeps)."""
    return track_setups(s, log, "base + head (floor)", s.floor)
