"""The check every export passes before it is installed: the artifact, run by its own runtime
in a fresh process where qmerge cannot be imported (`_child.py`), against the routed qmerge
model (`qmerge.load(base, pack)` with the same task or mixture) on the same inputs.

Reported per export:
  max_abs, max_rel     largest |artifact - routed| over all outputs, and that over max |routed|
                       (a classifier's logits; a causal LM's logits from the last prompt
                       position on; a bare encoder's hidden states)
  agreement            classifiers: top-1 agreement; causal LMs: teacher-forced next-token
                       agreement on the routed model's greedy continuation; encoders: share of
                       inputs whose mean-pooled outputs have cosine >= 0.99
  greedy_identical     causal LMs: prompts whose greedy continuation is token-for-token equal
  flip_margin_max      where top-1 differs: the largest gap between the routed model's two
                       best logits (small: the export only flips near-ties)
An exact export (fp32, no lossy conversion) passes when max_rel <= tolerance; a lossy one
(bf16/fp16, int8, truncated SVD) when agreement >= min_agreement.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmerge.errors import ConfigError, ExportError
from qmerge.verbs.export.selection import Selection

CHILD = Path(__file__).with_name("_child.py")
CHILD_LLAMA = Path(__file__).with_name("_child_llama.py")
TEXTS = [
    "The weather today is",
    "My favourite thing about the city is",
    "Please summarise the meeting notes in one sentence.",
    "The recipe needs two eggs, flour and",
    "In 1969 the first people walked on",
    "I can't believe how good this film was!",
    "The court ruled that the contract",
    "Our cat sleeps all day and",
]


@dataclass
class Probe:
    seqs: list[Tensor]  # token ids [L] per input (causal LM: the prompt)
    source: str
    texts: list[str] | None = None  # the texts behind `seqs` (None: random ids)


def probe(base: Path, config: dict, texts: list[str] | None, count: int) -> Probe:
    """Token ids for the check: `texts` (or the built-in ones) through the base's tokenizer,
    or seeded random ids when the base directory has no tokenizer."""
    chosen = (texts or TEXTS)[:count]
    has_tok = any(
        (base / f).exists()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    )
    if has_tok:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        pairs = [
            (t, torch.tensor(tok(t, truncation=True, max_length=128)["input_ids"])) for t in chosen
        ]
        pairs = [(t, s) for t, s in pairs if s.numel()]
        what = f"{len(pairs)} {'given' if texts else 'built-in'} texts"
        if pairs:
            return Probe([s for _, s in pairs], what, [t for t, _ in pairs])
    g = torch.Generator().manual_seed(0)
    vocab = int(config.get("vocab_size", 100))
    seqs = [
        torch.randint(min(3, vocab - 1), vocab, (8 + i % 5,), generator=g) for i in range(count)
    ]
    return Probe(seqs, f"{count} random token sequences (the base has no tokenizer)")


def eos_ids(config: dict) -> list[int]:
    e = config.get("eos_token_id")
    return [] if e is None else [int(x) for x in (e if isinstance(e, list) else [e])]


def _out(kind: str, out) -> Tensor:
    return (out.last_hidden_state if kind == "encoder" else out.logits)[0].float()


def reference(
    model: nn.Module, sel: Selection, kind: str, pr: Probe, new_tokens: int, eos: list[int]
) -> dict[str, Tensor]:
    """The routed model's outputs; for a causal LM the sequences become prompt + its greedy
    continuation (the artifact is then run on the same full sequences)."""
    from transformers import GenerationConfig

    route = sel.route()
    res: dict[str, Tensor] = {}
    with torch.no_grad():
        for i, seq in enumerate(pr.seqs):
            ids = seq[None]
            if kind == "causal-lm" and new_tokens:
                cfg = GenerationConfig(
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos or None,
                    pad_token_id=eos[0] if eos else 0,
                )
                ids = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=cfg,
                    **route,
                )
            res[f"seq.{i}"] = ids[0].clone()
            res[f"prompt.{i}"] = torch.tensor(seq.numel())
            out = _out(kind, model(input_ids=ids, attention_mask=torch.ones_like(ids), **route))
            # a causal LM: the logits that predict the continuation (and the token after it)
            res[f"out.{i}"] = out[seq.numel() - 1 :].contiguous() if kind == "causal-lm" else out
    return res


def llama_python() -> str | None:
    """The Python that runs llama.cpp for the GGUF checks: $QMERGE_LLAMA_PYTHON (an
    environment with llama-cpp-python, e.g. the bench's), else this one when `llama_cpp`
    imports here, else None."""
    env = os.environ.get("QMERGE_LLAMA_PYTHON")
    if env:
        if not Path(env).is_file():
            raise ConfigError(f"QMERGE_LLAMA_PYTHON={env}: no such interpreter")
        return env
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def runtime(fmt: str) -> tuple[str, Path, str]:
    """(interpreter, child script, the runtime's name) that checks format `fmt`. A GGUF file
    is run by llama.cpp where it is installed, else read by transformers' GGUF loader."""
    if fmt.startswith("gguf"):
        py = llama_python()
        if py is not None:
            return py, CHILD_LLAMA, "llama.cpp"
        return sys.executable, CHILD, "transformers GGUF loader (llama.cpp not installed)"
    return sys.executable, CHILD, fmt


def run_child(spec: dict, ref: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix="qmerge-check-") as tmp:
        t = Path(tmp)
        save_file(
            {k: v.contiguous() for k, v in ref.items() if not k.startswith("out.")},
            str(t / "inputs.safetensors"),
        )
        spec = dict(
            spec,
            inputs=str(t / "inputs.safetensors"),
            output=str(t / "outputs.safetensors"),
            count=count,
        )
        (t / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        py, child, _ = runtime(spec["format"])
        proc = subprocess.run(
            [py, str(child), str(t / "spec.json")],
            cwd=t,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
            raise ExportError(
                f"the {spec['format']} export failed to run in a fresh process "
                f"without qmerge:\n{tail}"
            )
        return load_file(str(t / "outputs.safetensors"))


def compare(kind: str, ref: dict[str, Tensor], got: dict[str, Tensor], count: int) -> dict:
    max_abs, ref_max = 0.0, 0.0
    agree = total = identical = 0
    flips: list[float] = []  # the routed model's top-1 minus top-2 logit where they disagree

    def score(r2: Tensor, g2: Tensor) -> int:
        same = r2.argmax(-1) == g2.argmax(-1)
        if not bool(same.all()):
            top = r2[~same].topk(2, dim=-1).values
            flips.extend((top[..., 0] - top[..., 1]).flatten().tolist())
        return int(same.sum())

    for i in range(count):
        r, g = ref[f"out.{i}"], got[f"out.{i}"]
        if kind == "classifier":
            r = r[..., : g.shape[-1]]  # the routed head pads to the widest task
        if r.shape != g.shape:
            raise ExportError(
                f"input {i}: the export's output is {list(g.shape)}, the routed "
                f"model's {list(r.shape)}"
            )
        max_abs = max(max_abs, float((r - g).abs().max()))
        ref_max = max(ref_max, float(r.abs().max()))
        if kind == "classifier":
            agree += score(r[None], g[None])
            total += 1
        elif kind == "encoder":
            agree += int(F.cosine_similarity(r.mean(0), g.mean(0), dim=0) >= 0.99)
            total += 1
        else:
            p = int(ref[f"prompt.{i}"])
            n = r.shape[0] - 1  # outputs start at the last prompt position
            if n:
                agree += score(r[:n], g[:n])
                total += n
            cont = ref[f"seq.{i}"][p:]
            identical += int(torch.equal(got[f"greedy.{i}"], cont))
    report = {
        "inputs": count,
        "max_abs": max_abs,
        "max_rel": max_abs / ref_max if ref_max else 0.0,
        "agreement": agree / total if total else 1.0,
        "compared": total,
        "flip_margin_max": max(flips) if flips else None,
    }
    if kind == "causal-lm":
        report["greedy_identical"] = f"{identical}/{count}"
    return report


def verify(
    model: nn.Module,
    sel: Selection,
    spec: dict,
    pr: Probe,
    new_tokens: int,
    exact: bool,
    tolerance: float,
    min_agreement: float,
) -> dict:
    """Runs the check; raises ExportError (with the numbers) when the export fails it."""
    eos = spec["eos"]
    ref = reference(model, sel, spec["kind"], pr, new_tokens, eos)
    got = run_child(spec, ref, len(pr.seqs))
    rep = compare(spec["kind"], ref, got, len(pr.seqs))
    rep.update(source=pr.source, exact=exact, fresh_process_without_qmerge=True)
    rep["runtime"] = runtime(spec["format"])[2]
    if "tokenizer_identical" in got:
        same, n = got["tokenizer_identical"].tolist()
        rep["tokenizer_identical"] = f"{same}/{n}"
    if exact:
        rep["criterion"] = f"max_rel <= {tolerance:g}"
        ok = rep["max_rel"] <= tolerance
    else:
        rep["criterion"] = f"agreement >= {min_agreement:g}"
        ok = rep["agreement"] >= min_agreement
    rep["passed"] = ok
    if not ok:
        raise ExportError(
            f"the {spec['format']} export does not match the routed model "
            f"({rep['criterion']} fails: max_rel {rep['max_rel']:.3g}, "
            f"agreement {rep['agreement']:.3f} over {rep['compared']} outputs); "
            f"nothing was written"
        )
    return rep
