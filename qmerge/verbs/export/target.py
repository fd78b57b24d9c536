"""The transformers model an export becomes: its class, its config.json, and the name every
pack tensor takes in its state dict.

The class follows the pack as `qmerge.load` does (a sequence classifier when the tasks have
heads, a causal LM for a `*ForCausalLM` base, else the bare model). It is instantiated on the
meta device (no memory) to learn its tensor names and which ones are tied, so the export holds
exactly what `from_pretrained` of that class reads, spelled its way (a base saved as a bare
`BertModel` says `encoder...`, the classifier `bert.encoder...`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qmerge.errors import CheckpointError, ConfigError, ExportError
from qmerge.format.names import alignment
from qmerge.format.pack import Pack

KINDS = {
    "AutoModelForSequenceClassification": "classifier",
    "AutoModelForCausalLM": "causal-lm",
    "AutoModel": "encoder",
}
# files of the base directory an export carries: tokenizer and generation settings
SIDE_FILES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens_map",
    "added_tokens",
    "spiece",
    "sentencepiece",
    "generation_config",
    "chat_template",
    "preprocessor_config",
)


@dataclass
class Target:
    auto: str  # the transformers Auto class that loads it
    arch: str  # the concrete class, e.g. "BertForSequenceClassification"
    config: dict  # the config.json to write
    names: dict[str, str]  # pack tensor name -> state-dict name written
    tied: dict[str, str] = field(default_factory=dict)  # alias -> the name it shares
    linears: set[str] = field(default_factory=set)  # pack names of nn.Linear weights
    embeddings: set[str] = field(default_factory=set)  # pack names of nn.Embedding weights
    modules: dict[str, str] = field(default_factory=dict)  # pack name -> owning module path

    @functools.cached_property
    def sources(self) -> dict[str, str]:
        """state-dict name -> pack tensor name (the inverse of `names`)."""
        return {t: s for s, t in self.names.items()}

    @property
    def kind(self) -> str:
        return KINDS[self.auto]

    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """An instance of the class with this config (weights uninitialised)."""
        return _instantiate(self.auto, self.config, dtype, meta=False)


def auto_class(config: dict, pack: Pack) -> str:
    arch = " ".join(config.get("architectures") or [])
    if any(pack.manifest["tasks"][t].get("heads") for t in pack.tasks):
        return "AutoModelForSequenceClassification"
    if "CausalLM" in arch:
        return "AutoModelForCausalLM"
    return "AutoModel"


def _instantiate(auto: str, config: dict, dtype: torch.dtype, meta: bool) -> nn.Module:
    import transformers

    cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in config.items() if k not in ("architectures",)}
    )
    cls = getattr(transformers, auto)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if meta:
            with torch.device("meta"):
                return cls.from_config(cfg, dtype=dtype)
        return cls.from_config(cfg, dtype=dtype).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def read_config(base: Path) -> dict:
    try:
        cfg = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{base}: no readable config.json ({e}); an export needs the "
            f"base's Hugging Face directory"
        ) from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CheckpointError(f"{base / 'config.json'}: has no model_type")
    return cfg


def resolve(
    base: Path,
    pack: Pack,
    head: dict[str, torch.Tensor],
    labels: list[str] | None,
    dtype: torch.dtype,
) -> Target:
    """The target model for exporting `pack` over `base` with the selection's `head`."""
    config = read_config(base)
    auto = auto_class(config, pack)
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    if auto == "AutoModelForSequenceClassification":
        widths = {v.shape[0] for k, v in head.items() if v.dim() == 2}
        if len(widths) != 1:
            raise ExportError(f"{pack.path}: cannot tell the number of labels from the head")
        n = widths.pop()
        names = labels if labels and len(labels) == n else [f"LABEL_{i}" for i in range(n)]
        config.update(
            num_labels=n,
            id2label={str(i): s for i, s in enumerate(names)},
            label2id={s: i for i, s in enumerate(names)},
        )
    config["dtype"] = str(dtype).removeprefix("torch.")
    model = _instantiate(auto, config, torch.float32, meta=True)
    config["architectures"] = [type(model).__name__]

    by_id: dict[int, str] = {}
    tied: dict[str, str] = {}
    state_names = list(model.state_dict())
    params = dict(model.named_parameters(remove_duplicate=False))
    for n in state_names:
        p = params.get(n)
        if p is None:
            continue
        if id(p) in by_id:
            tied[n] = by_id[id(p)]
        else:
            by_id[id(p)] = n
    writable = [n for n in state_names if n not in tied]
    source = list(pack.base_fingerprint["tensors"]) + list(head)
    _, rename = alignment(source, writable)
    mapped = {s: rename(s) for s in source}
    want = set(writable)
    names = {s: t for s, t in mapped.items() if t in want}
    if missing := sorted(want - set(names.values())):
        raise ExportError(
            f"{base}: the {config['architectures'][0]} export needs "
            f"'{missing[0]}', which neither the base nor the task heads have "
            f"({len(missing)} such tensors)"
        )
    floats = {s for s, e in pack.base_fingerprint["tensors"].items() if e["dtype"][0] in "FB"}
    changed = {n for t in pack.tasks for n in pack.entries(t)}
    dropped = [
        s
        for s in source
        if s not in names and (s in floats or s in head) and (mapped[s] not in tied or s in changed)
    ]
    if dropped:
        raise ConfigError(
            f"{pack.path}: base tensor '{dropped[0]}' has no place in "
            f"{config['architectures'][0]}; is this the base's architecture?"
        )
    target = Target(auto, config["architectures"][0], config, names, tied)
    modules = dict(model.named_modules())
    for mod_name, mod in modules.items():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            src = target.sources.get(full) or target.sources.get(tied.get(full, ""))
            if src is None:
                continue
            target.modules.setdefault(src, mod_name)
            if pname == "weight" and type(mod) is nn.Linear and full not in tied:
                target.linears.add(src)
            elif pname == "weight" and type(mod) is nn.Embedding:
                target.embeddings.add(src)
    return target


def copy_side_files(base: Path, out: Path) -> list[str]:
    """Copies the base directory's tokenizer and generation files."""
    copied = []
    for f in sorted(base.iterdir()):
        if not f.is_file() or not f.name.startswith(SIDE_FILES):
            continue
        (out / f.name).write_bytes(f.read_bytes())
        copied.append(f.name)
    return copied
