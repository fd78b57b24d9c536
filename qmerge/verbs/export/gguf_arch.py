"""What a GGUF file of a transformers causal LM holds besides its tokenizer: the llama.cpp
architecture, the hyperparameters (`{arch}.*` keys), each tensor's GGUF name, the row order
llama.cpp expects for Q and K, and the storage type of each tensor for a `--gguf-type`.

Only architectures whose tensors need nothing but renaming (and the Q/K row order below) are
accepted; others are refused naming the model_type.

Q/K rows: transformers' Llama splits each head's rotary pairs as (first half, second half)
("rotate_half"); llama.cpp's LLAMA graph rotates adjacent pairs. The same attention in
llama.cpp needs each head's rows interleaved: row (h, i, j) of the head's [2, d/2] grid
becomes row (h, j, i). Applied to the weight (and to a LoRA's B, whose rows are the
weight's output rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmerge.errors import ConfigError, ExportError

# transformers model_type -> llama.cpp architecture (same tensors, same graph)
ARCHS = {"llama": "llama", "mistral": "llama"}
# --gguf-type: the type of the 2-D weight matrices (Types below)
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0")
OUTPUT_AUTO = {"q8_0": "f16", "q5_0": "q8_0", "q4_1": "q8_0", "q4_0": "q8_0"}


def gguf():
    try:
        import gguf as mod
    except ImportError:
        raise ConfigError(
            "the gguf formats need the `gguf` package (pip install 'qmerge[gguf]')"
        ) from None
    return mod


@dataclass
class Arch:
    name: str  # llama.cpp's architecture, e.g. "llama"
    heads: int
    kv_heads: int
    head_dim: int
    blocks: int
    config: dict

    @functools.cached_property
    def _names(self):
        """llama.cpp's name map for this architecture (built once: ~7 ms for 30 blocks)."""
        g = gguf()
        return g.get_tensor_name_map(g.MODEL_ARCH[self.name.upper()], self.blocks)

    def rename(self, hf_name: str) -> str:
        """The GGUF name of state-dict tensor `hf_name`."""
        got = self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if got is None:
            raise ExportError(f"'{hf_name}' has no name in llama.cpp's {self.name} layout")
        return got

    def reorder_rows(self, hf_name: str, t: Tensor) -> Tensor:
        """`t` (rows = the weight's output rows) in llama.cpp's order for Q and K."""
        if hf_name.endswith("q_proj.weight"):
            return _interleave(t, self.heads)
        if hf_name.endswith("k_proj.weight"):
            return _interleave(t, self.kv_heads)
        return t

    def metadata(self, writer) -> None:
        """The `{arch}.*` hyperparameters llama.cpp reads."""
        c = self.config
        writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(c["hidden_size"]))
        writer.add_block_count(self.blocks)
        writer.add_feed_forward_length(int(c["intermediate_size"]))
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim * self.heads != int(c["hidden_size"]):
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(rope_theta(c))
        writer.add_vocab_size(int(c["vocab_size"]))


def rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError(
            f"rope scaling {kind!r} is not exported to GGUF yet (only the default rope)"
        )
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _interleave(t: Tensor, heads: int) -> Tensor:
    rows = t.shape[0]
    if rows % (2 * heads):
        raise ExportError(f"{rows} rows do not split into {heads} rotary heads")
    rest = t.shape[1:]
    return t.reshape(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(t.shape)


def arch(config: dict) -> Arch:
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise ConfigError(f"GGUF export supports model_type {sorted(ARCHS)}; the base is {mt!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError("GGUF export of a Llama with attention or MLP biases is not supported")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return Arch(
        ARCHS[mt],
        heads,
        int(config.get("num_key_value_heads") or heads),
        int(config.get("head_dim") or hidden // heads),
        int(config["num_hidden_layers"]),
        config,
    )


@dataclass(frozen=True)
class Types:
    """What `--gguf-type MATRICES[:output=TYPE]` stores: the weight matrices in `matrices`,
    the output layer (and the token embedding, which a tied model shares with it) in
    `output`, vectors (norms, biases) in F32 as llama.cpp's converter does. By default the
    output layer stays a step above a quantized type (OUTPUT_AUTO), as llama.cpp's own
    quantizer keeps it: it is the largest single matrix of a small LM and its error goes
    straight into the logits."""

    matrices: str
    output: str

    def of(self, hf_name: str, shape: tuple[int, ...]):
        """The GGMLQuantizationType of a tensor. A quantized matrix whose rows do not split
        into 32-wide blocks falls back to F16, as llama.cpp's converter does."""
        q = gguf().GGMLQuantizationType
        if len(shape) < 2:
            return q.F32
        out = "embed_tokens" in hf_name or "lm_head" in hf_name
        t = getattr(q, (self.output if out else self.matrices).upper())
        if t not in (q.F32, q.F16, q.BF16) and shape[-1] % 32:
            return q.F16
        return t


def types(spec: str) -> Types:
    """Parses `--gguf-type`: 'q8_0', or 'q8_0:output=q8_0' to choose the output layer's."""
    matrices, _, rest = spec.partition(":")
    output = OUTPUT_AUTO.get(matrices, matrices)
    if rest:
        key, _, value = rest.partition("=")
        if key != "output" or not value:
            raise ConfigError(f"gguf type {spec!r}: the one option is ':output=TYPE'")
        output = value
    for t in (matrices, output):
        if t not in TYPES:
            raise ConfigError(f"gguf type must be one of {', '.join(TYPES)}, got {t!r}")
    return Types(matrices, output)


def file_type(gguf_type: str) -> int:
    f = gguf().LlamaFileType
    return int(getattr(f, "ALL_F32" if gguf_type == "f32" else f"MOSTLY_{gguf_type.upper()}"))


def encode(t: Tensor, qtype) -> np.ndarray:
    """fp32 tensor -> the bytes (or array) stored for `qtype`."""
    g = gguf()
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == g.GGMLQuantizationType.F32:
        return a
    if qtype == g.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return g.quants.quantize(a, qtype)
