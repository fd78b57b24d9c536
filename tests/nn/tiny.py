"""Tiny transformers models on disk for the routing tests: a Llama-style causal LM and a BERT
classifier, each with fine-tunes (the base plus noise; classifiers with their own heads)."""

from __future__ import annotations

from pathlib import Path

import torch

import qmerge

EXACT = qmerge.Policy(
    codec="dense:dtype=fp32", vectors="dense:dtype=fp32", types={"norm": "dense:dtype=fp32"}
)


def llama_config(tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def perturbed(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1))
    return model.eval()


def llama(root: Path, tasks: int = 3, tie: bool = True) -> tuple[Path, dict[str, Path]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(tie)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    fts = {}
    for i in range(tasks):
        m = LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        perturbed(m, 100 + i).save_pretrained(root / f"ft{i}")
        fts[f"t{i}"] = root / f"ft{i}"
    return root / "base", fts


def bert(root: Path, labels: tuple[int, ...] = (3, 5, 2)) -> tuple[Path, dict[str, Path]]:
    """A bare BertModel base and BertForSequenceClassification fine-tunes ('bert.' prefix)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=80,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    base = BertModel(cfg).eval()
    base.save_pretrained(root / "base")
    fts = {}
    for i, n in enumerate(labels):
        ccfg = BertConfig(**cfg.to_dict())
        ccfg.num_labels = n
        ccfg.id2label = {k: f"label{k}" for k in range(n)}
        ccfg.label2id = {f"label{k}": k for k in range(n)}
        m = BertForSequenceClassification(ccfg)
        m.bert.load_state_dict(base.state_dict())
        perturbed(m, 200 + i).save_pretrained(root / f"cls{i}")
        fts[f"c{i}"] = root / f"cls{i}"
    return root / "base", fts


def compress(
    base: Path,
    fts: dict[str, Path],
    out: Path,
    codec: str | qmerge.Policy = EXACT,
    heads: tuple[str, ...] = (),
) -> Path:
    policy = codec if isinstance(codec, qmerge.Policy) else qmerge.Policy(codec=codec)
    qmerge.compress(base, fts, out, opts=qmerge.Options(policy=policy, heads=heads, progress=False))
    return out


WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "fast",
    "slow",
    "red",
    "blue",
    "big",
    "small",
    "a",
    "is",
    "was",
    "very",
    "not",
    "and",
    "or",
]


def save_tokenizer(directory: Path, vocab_size: int, specials: dict[str, int]) -> None:
    """A word-level tokenizer over WORDS (ids after the specials), saved beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for w in WORDS:
        vocab[w] = len(vocab)
    assert len(vocab) <= vocab_size
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    names = {v: k for k, v in specials.items()}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token=names.get(0),
        **({"eos_token": "[EOS]"} if "[EOS]" in specials else {}),
    )
    tok.save_pretrained(directory)
