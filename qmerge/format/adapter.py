"""PEFT LoRA adapters as qmerge reads them: a directory with `adapter_config.json` and
`adapter_model.safetensors` (or `adapter_model.bin`, read with `weights_only=True`).

An adapted module M of the base changes its weight by a rank-r product, exactly:

    Linear       M.weight [out, in]  += s · B @ A          (A = M.lora_A.weight [r, in],
    Conv1D (GPT-2, fan_in_fan_out)   += s · (B @ A)ᵀ        B = M.lora_B.weight [out, r])
    Embedding    M.weight [num, dim] += s · (B @ A)ᵀ        (A = M.lora_embedding_A [r, num],
                                                             B = M.lora_embedding_B [dim, r])

with s = lora_alpha / r (`lora_alpha / sqrt(r)` with `use_rslora`), r and alpha per module
where `rank_pattern` / `alpha_pattern` name it. `low_rank` gives these as (U, V) with
ΔW = U @ V, never building ΔW. Tensors saved whole (`modules_to_save`, and an embedding's
`base_layer` when PEFT saves it) are the fine-tuned values of those base tensors (`full`).

What the routed model cannot reproduce exactly is refused naming the key: DoRA, LoRA biases,
other PEFT types, convolutions, layer replication, `target_parameters`, trainable tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qmerge.errors import CheckpointError
from qmerge.format.names import alignment
from qmerge.format.safetensors_io import SafetensorsFile

CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_[AB])$")
# keys of adapter_config.json that change what the adapter computes, and the value under
# which qmerge can reproduce it exactly
_MUST = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "alora_invocation_tokens": (None, []),
    "megatron_config": (None, {}),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
}


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter directory (it holds adapter_config.json)."""
    return (Path(path) / CONFIG).is_file()


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module
    name's end (a regex over whole dotted components), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LowRank:
    """One adapted base tensor: ΔW = U @ V (U [rows, r], V [r, cols]) in the adapter's dtype
    (fp32 when the scale s could not be folded into it exactly)."""

    U: Tensor
    V: Tensor
    rank: int
    scaling: float
    kind: str  # "linear", "conv1d" or "embedding"


class LoraAdapter:
    """A PEFT LoRA adapter, opened and checked (`check` against a base)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.config = json.loads((self.path / CONFIG).read_text())
        except OSError as e:
            raise CheckpointError(f"{self.path / CONFIG}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise CheckpointError(f"{self.path / CONFIG}: not valid JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.path / CONFIG}: is not a JSON object")
        self._check_config()
        self._tensors = self._read_tensors()
        self._split()

    # -- reading ---------------------------------------------------------------------------

    def _refuse(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; qmerge cannot apply it exactly")

    def _check_config(self) -> None:
        c = self.config
        kind = c.get("peft_type")
        if kind != "LORA":
            raise self._refuse(f"is a PEFT {kind!r} adapter, not LORA")
        for key, ok in _MUST.items():
            if c.get(key) not in ok:
                raise self._refuse(f"adapter_config.json sets {key}={c[key]!r}")
        if c.get("bias", "none") != "none":
            raise self._refuse(f"adapter_config.json sets bias={c['bias']!r} (trained biases)")
        for key in ("r", "lora_alpha"):
            if not isinstance(c.get(key), int | float) or c[key] <= 0:
                raise CheckpointError(f"{self.path / CONFIG}: {key} must be a positive number")

    def _read_tensors(self) -> dict[str, Tensor]:
        st, binf = self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"
        if st.is_file():
            f = SafetensorsFile(st, error=CheckpointError)
            return {k: f.get(k) for k in f.keys()}
        if binf.is_file():
            from qmerge.format.checkpoint import _load_bin

            return dict(_load_bin(binf))
        raise CheckpointError(f"{self.path}: no adapter_model.safetensors or adapter_model.bin")

    def _split(self) -> None:
        """Sorts the saved keys into factor pairs per module and whole tensors."""
        self.factors: dict[str, dict[str, Tensor]] = {}
        self.whole: dict[str, Tensor] = {}
        for key, t in self._tensors.items():
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            m = _LORA.match(name)
            if m:
                self.factors.setdefault(m["module"], {})[m["part"]] = t
            elif "lora_" in name:
                raise self._refuse(f"holds '{key}' (not a LoRA factor qmerge knows)")
            else:
                name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                self.whole[name] = t
        if not self.factors and not self.whole:
            raise CheckpointError(f"{self.path}: the adapter holds no tensors")
        for module, parts in self.factors.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            need = (
                ("lora_embedding_A", "lora_embedding_B")
                if emb
                else ("lora_A.weight", "lora_B.weight")
            )
            if missing := [p for p in need if p not in parts]:
                raise CheckpointError(f"{self.path}: module '{module}' has no {missing[0]}")
            if any(parts[p].dim() != 2 for p in need):
                raise self._refuse(
                    f"module '{module}' has factors that are not matrices (a convolution)"
                )

    # -- what it changes ------------------------------------------------------------------

    def scaling(self, module: str) -> tuple[int, float]:
        """(rank, scale s) of one adapted module, as PEFT computes them."""
        c = self.config
        parts = self.factors[module]
        a = parts.get("lora_A.weight", parts.get("lora_embedding_A"))
        r = int(a.shape[0])
        alpha = float(_pattern_value(c.get("alpha_pattern") or {}, module, c["lora_alpha"]))
        root = math.sqrt(r) if c.get("use_rslora") else r
        return r, alpha / root

    def base_names(self, reference: list[str]) -> dict[str, str]:
        """Adapter name ('<module>.weight' or a whole tensor's name) -> the base's spelling."""
        names = [f"{m}.weight" for m in self.factors] + list(self.whole)
        _, rename = alignment(names, reference)
        return {n: rename(n) for n in names}

    def low_rank(self, module: str, base_shape: tuple[int, ...]) -> LowRank:
        """The module's ΔW as U @ V, checked against the base tensor's shape."""
        parts = self.factors[module]
        r, s = self.scaling(module)
        if "lora_embedding_A" in parts:
            A, B, kind = parts["lora_embedding_A"], parts["lora_embedding_B"], "embedding"
        else:
            A, B = parts["lora_A.weight"], parts["lora_B.weight"]
            kind = "conv1d" if self.config.get("fan_in_fan_out") else "linear"
        if A.shape[0] != B.shape[1]:
            raise CheckpointError(
                f"{self.path}: module '{module}': A has rank {A.shape[0]}, B {B.shape[1]}"
            )
        want = (B.shape[0], A.shape[1]) if kind == "linear" else (A.shape[1], B.shape[0])
        if tuple(base_shape) != want:
            raise CheckpointError(
                f"{self.path}: module '{module}' ({kind}) changes a {list(want)} weight but the "
                f"base's is {list(base_shape)}; is it an adapter of this base?"
            )
        U, V = (B, A) if kind == "linear" else (A.T, B.T)
        dtype = U.dtype if U.dtype == V.dtype and s == 2.0 ** round(math.log2(s)) else None
        U = U.to(dtype or torch.float32) * s  # exact when s is a power of two
        return LowRank(U.contiguous(), V.to(U.dtype).contiguous(), r, s, kind)
