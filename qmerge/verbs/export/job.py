"""One export's inputs, shared by the format writers: the base, the pack, what is baked in,
the target model and the options."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qmerge.format.checkpoint import Checkpoint
from qmerge.format.pack import Pack
from qmerge.verbs.export.merged import merged
from qmerge.verbs.export.selection import Selection
from qmerge.verbs.export.target import Target


@dataclass
class Job:
    base: Path
    pack: Pack
    sel: Selection
    target: Target
    head: dict[str, Tensor]  # the selection's head tensors (pack names), fp32
    dtype: torch.dtype  # of the written floating-point tensors
    rank: int = 16  # peft: rank of a truncated SVD of a non-low-rank residual
    max_shard_bytes: int = 2 << 30  # hf: shard above this
    gguf_type: str = "f16"  # gguf, gguf-lora: the type of the matrices written
    gguf_base: Path | None = None  # gguf-lora: the base GGUF the adapter is checked over
    runtime: str | None = None  # peft: "vllm" writes only what vLLM loads
    progress: Callable[[Iterable], Iterable] = iter
    _ckpt: Checkpoint | None = field(default=None, repr=False)

    @property
    def checkpoint(self) -> Checkpoint:
        if self._ckpt is None:
            self._ckpt = Checkpoint(self.base)
        return self._ckpt

    def tensor(self, src: str) -> Tensor:
        """Pack tensor `src` as exported, fp32: the selection's head, or the merged weight."""
        if src in self.head:
            return self.head[src]
        return merged(self.pack, self.checkpoint, self.sel, src)

    def merged_model(self) -> nn.Module:
        """The target model holding the merged weights in fp32, in memory (ONNX, peft base)."""
        model = self.target.build(torch.float32)
        state = {dst: self.tensor(src) for src, dst in self.target.names.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m not in self.target.tied]
        if missing or unexpected:
            from qmerge.errors import ExportError

            raise ExportError(
                f"the merged state does not fit {self.target.arch}: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}"
            )
        return model.eval()
