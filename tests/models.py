"""Tiny Llama-shaped checkpoints on disk for the pack tests (a base and its fine-tunes)."""

from __future__ import annotations

from pathlib import Path

import torch

from qmerge.format.safetensors_io import write_safetensors

SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.q_proj.bias": (16,),
    "model.layers.0.mlp.up_proj.weight": (48, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 48),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
}


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.1 for n, s in SHAPES.items()}


def finetune_of(
    base: dict[str, torch.Tensor],
    seed: int,
    scale: float = 0.01,
    frozen: tuple[str, ...] = ("model.norm.weight",),
) -> dict[str, torch.Tensor]:
    """The base plus a random task vector; `frozen` tensors keep the base's values."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        n: t.clone() if n in frozen else t + scale * torch.randn(t.shape, generator=g)
        for n, t in base.items()
    }


def save(tensors: dict[str, torch.Tensor], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "model.safetensors", "wb") as f:
        write_safetensors(f, tensors)
    return directory


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (but the lock) and its bytes: to check nothing changed."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
