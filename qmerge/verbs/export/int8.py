"""The `int8` format: the compact edge build. The merged model with every Linear and Embedding
weight (task heads aside) quantized to int8 per output channel (symmetric, scale = absmax/127
per row), other tensors in the export dtype, plus `qmerge_int8.py`, a loader that needs only
torch, transformers and safetensors (int8_loader.py is that file)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from qmerge.format.safetensors_io import write_safetensors
from qmerge.verbs.export.hf import cast, tensors, write_config
from qmerge.verbs.export.int8_loader import SCALE, WEIGHTS
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.target import copy_side_files

LOADER = "qmerge_int8.py"


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: w ~= q * scale[:, None]; an all-zero row gets scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def write(job: Job, out: Path) -> dict:
    quantize = (job.target.linears | job.target.embeddings) - set(job.head)
    state: dict[str, Tensor] = {}
    done = 0
    items = list(tensors(job))
    for src, dst, make in job.progress(items):
        t = make()
        if src in quantize:
            state[dst], state[dst + SCALE] = quantize_rows(t)
            done += 1
        else:
            state[dst] = cast(t, job.dtype)
    with open(out / WEIGHTS, "wb") as f:
        write_safetensors(f, state, metadata={"format": "qmerge-int8"})
    write_config(job, out)
    copy_side_files(job.base, out)
    shutil.copyfile(Path(__file__).with_name("int8_loader.py"), out / LOADER)
    return {"quantized": done, "kept": len(items) - done, "loader": LOADER}
