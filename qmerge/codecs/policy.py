"""Which codec each tensor of each task gets.

Tensors are sorted into module types by name (1bit-Merging found chat-like tasks live mostly
in attention, math/code in the MLP, so each type can have its own codec):

    attention  q/k/v/o projections, query/key/value, attn.*     mlp  gate/up/down, fc1/fc2,
    embedding  token/position embeddings, lm_head               intermediate, BERT output.dense
    norm       LayerNorm / RMSNorm weights and biases           other  everything else

Resolution for a tensor, first match wins: the task's `patterns`, the policy's `patterns`
(fnmatch globs on the tensor name); then for vectors (ndim < 2) `types["norm"]` for norms and
`vectors` for the rest (biases); then the task's `types`, the policy's `types`, and `codec`.
A delta that is exactly zero, or whose largest magnitude is <= `skip_below`, is always `skip`.

A policy file is JSON with the same keys:

    {"codec": "sign", "types": {"mlp": "lowrank:energy=0.9", "norm": "dense:dtype=fp16"},
     "vectors": "dense", "patterns": {"lm_head.weight": "dense"}, "skip_below": 0.0,
     "tasks": {"chat": {"types": {"attention": "lowrank:rank=64"}}}}

Specs are codec specs (`"name:key=value,..."`), or `"auto"` / `"auto:sqnr_db=8"`. A Policy
parses every spec once, when it is made; `spec_for` hands out the parsed `CodecChoice`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmerge.codecs.auto import AutoConfig
from qmerge.codecs.base import CodecChoice, parse_spec
from qmerge.errors import ConfigError

LOSSLESS = "dense:dtype=fp32"
MODULE_TYPES = ("attention", "mlp", "embedding", "norm", "other")
_RULES = (
    ("norm", re.compile(r"(^|[._])(\w*norm\w*|ln(_?\w+)?)(\.|$)", re.I)),
    (
        "embedding",
        re.compile(r"(embed|(^|\.)(wte|wpe|lm_head|shared|word_embeddings)(\.|$))", re.I),
    ),
    (
        "attention",
        re.compile(
            r"(attn|attention|(^|\.)(q|k|v|o|qkv|query|key|value)(_proj)?"
            r"(\.|$))",
            re.I,
        ),
    ),
    (
        "mlp",
        re.compile(
            r"(mlp|ffn|feed_forward|intermediate|(^|\.)(gate_proj|up_proj|down_proj"
            r"|fc1|fc2|c_fc|w1|w2|w3)(\.|$)|(^|\.)layer\.\d+\.output\.dense)",
            re.I,
        ),
    ),
)


def module_type(name: str) -> str:
    """The module type of a tensor from its name (see the module docstring)."""
    for kind, rule in _RULES:
        if rule.search(name):
            return kind
    return "other"


def resolve(spec: str | CodecChoice) -> CodecChoice:
    """A codec spec (or "auto[:sqnr_db=N]") parsed: (codec name or "auto", its config);
    ConfigError unless it is valid. A CodecChoice passes through as it is."""
    if isinstance(spec, CodecChoice):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(
            f"a codec spec must be a string such as 'sign' or 'lowrank:rank=16', got {spec!r}"
        )
    if spec.partition(":")[0].strip() == "auto":
        return CodecChoice("auto", make_auto(spec))
    return parse_spec(spec)


def make_auto(spec: str) -> AutoConfig:
    _, _, rest = spec.partition(":")
    values: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if key != "sqnr_db" or not eq:
            raise ConfigError(f"codec spec {spec!r}: auto takes only sqnr_db=<dB>")
        try:
            values["sqnr_db"] = float(value)
        except ValueError:
            raise ConfigError(f"codec spec {spec!r}: sqnr_db must be a number") from None
    return AutoConfig(**values)  # type: ignore[arg-type]


def _spec_map(
    where: str, obj: object, parsed: dict[str, CodecChoice], keys: tuple[str, ...] | None = None
) -> None:
    if not isinstance(obj, dict):
        raise ConfigError(f"policy {where} must be an object of name -> codec spec")
    for k, v in obj.items():
        if keys is not None and k not in keys:
            raise ConfigError(
                f"policy {where}: unknown module type {k!r}; types: {', '.join(keys)}"
            )
        if not isinstance(v, str):
            raise ConfigError(f"policy {where}[{k!r}] must be a codec spec string, got {v!r}")
        _parse(v, parsed, f"policy {where}[{k!r}]")


def _parse(spec: object, parsed: dict[str, CodecChoice], where: str) -> None:
    if not isinstance(spec, str):
        raise ConfigError(f"{where} must be a codec spec string, got {spec!r}")
    if spec not in parsed:
        parsed[spec] = resolve(spec)


@dataclass(frozen=True)
class Policy:
    """Codec choice per tensor. Attributes as in the module docstring."""

    codec: str = "sign"
    types: Mapping[str, str] = field(default_factory=dict)
    vectors: str = "dense"
    patterns: Mapping[str, str] = field(default_factory=dict)
    skip_below: float = 0.0
    tasks: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)

    def __post_init__(self):
        parsed: dict[str, CodecChoice] = {}  # spec text -> its parsed choice
        _parse(self.codec, parsed, "policy codec")
        _parse(self.vectors, parsed, "policy vectors")
        _parse("dense", parsed, "policy norms")  # the norms' default (_spec_text)
        _spec_map("types", self.types, parsed, MODULE_TYPES)
        _spec_map("patterns", self.patterns, parsed)
        if not (type(self.skip_below) in (int, float) and self.skip_below >= 0):
            raise ConfigError(f"policy skip_below must be a number >= 0, got {self.skip_below!r}")
        if not isinstance(self.tasks, dict):
            raise ConfigError("policy tasks must be an object of task -> {types, patterns}")
        for task, over in self.tasks.items():
            if not isinstance(over, dict) or set(over) - {"types", "patterns"}:
                raise ConfigError(f"policy tasks[{task!r}] may only hold 'types' and 'patterns'")
            _spec_map(f"tasks[{task!r}].types", over.get("types", {}), parsed, MODULE_TYPES)
            _spec_map(f"tasks[{task!r}].patterns", over.get("patterns", {}), parsed)
        object.__setattr__(self, "_parsed", parsed)  # not a field: config_dict stays JSON

    @classmethod
    def lossless(cls) -> Policy:
        """Every tensor kind (matrices, biases, norms) as an fp32 dense delta: the pack gives
        back every fine-tune bit for bit (checked per tensor by `Options(lossless=True)`)."""
        return cls(codec=LOSSLESS, vectors=LOSSLESS, types={"norm": LOSSLESS})

    def choice(self, spec: str) -> CodecChoice:
        """The parsed form of one of this policy's specs."""
        return self._parsed[spec]  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], where: str = "policy") -> Policy:
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: must be a JSON object")
        known = {"codec", "types", "vectors", "patterns", "skip_below", "tasks"}
        if unknown := sorted(set(obj) - known):
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(known))}"
            )
        try:
            return cls(**obj)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path, codec: str | None = None) -> Policy:
        try:
            obj = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the policy: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"{path}: the policy is not valid JSON ({e})") from None
        if codec is not None and isinstance(obj, dict):
            obj.setdefault("codec", codec)
        return cls.from_dict(obj, str(path))

    def spec_for(self, task: str, name: str, ndim: int) -> tuple[str, CodecChoice]:
        """(module type, parsed codec choice) of tensor `name` of `task`."""
        kind = module_type(name)
        return kind, self.choice(self._spec_text(task, name, ndim, kind))

    def _spec_text(self, task: str, name: str, ndim: int, kind: str) -> str:
        over = self.tasks.get(task, {})
        for patterns in (over.get("patterns", {}), self.patterns):
            for glob, spec in patterns.items():
                if fnmatch.fnmatchcase(name, glob):
                    return spec
        if ndim < 2:
            if kind == "norm":
                return over.get("types", {}).get("norm") or self.types.get("norm") or "dense"
            return self.vectors
        return over.get("types", {}).get(kind) or self.types.get(kind) or self.codec
