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

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qmerge.errors import ConfigError, ExportError

# transformers model_type -> llama.cpp architecture (same tensors, same graph)
ARCHS = {"llama": "llama", "mistral": "llama"}
# --gguf-type: the type of the 2-D weight matrices; vectors (norms, biases) are always F32,
# as llama.cpp's own converter stores them
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


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

    def rename(self, hf_name: str) -> str:
        """The GGUF name of state-dict tensor `hf_name`."""
        g = gguf()
        arch = g.MODEL_ARCH[self.name.upper()]
        got = g.get_tensor_name_map(arch, self.blocks).get_name(
            hf_name, try_suffixes=(".weight", ".bias")
        )
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


def storage(gguf_type: str, hf_name: str, shape: tuple[int, ...]):
    """The GGMLQuantizationType a tensor is stored in. Matrices take `gguf_type`; a matrix
    whose rows do not split into 32-wide blocks falls back to F16 (llama.cpp's converter does
    the same); at q4_0 the token embedding (the tied output layer too) stays Q8_0, where
    4 bits cost the most accuracy for the fewest bytes saved, as llama.cpp's quantizer keeps it."""
    q = gguf().GGMLQuantizationType
    if len(shape) < 2:
        return q.F32
    want = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}
    if gguf_type not in want:
        raise ConfigError(f"gguf type must be one of {', '.join(TYPES)}, got {gguf_type!r}")
    t = want[gguf_type]
    if t == q.Q4_0 and ("embed_tokens" in hf_name or "lm_head" in hf_name):
        t = q.Q8_0
    if t in (q.Q8_0, q.Q4_0) and shape[-1] % 32:
        return q.F16
    return t


def file_type(gguf_type: str) -> int:
    f = gguf().LlamaFileType
    return int(
        {
            "f32": f.ALL_F32,
            "f16": f.MOSTLY_F16,
            "bf16": f.MOSTLY_BF16,
            "q8_0": f.MOSTLY_Q8_0,
            "q4_0": f.MOSTLY_Q4_0,
        }[gguf_type]
    )


def encode(t: Tensor, qtype) -> np.ndarray:
    """fp32 tensor -> the bytes (or array) stored for `qtype`."""
    g = gguf()
    a = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == g.GGMLQuantizationType.F32:
        return a
    if qtype == g.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return g.quants.quantize(a, qtype)
