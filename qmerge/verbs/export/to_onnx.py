"""The `onnx` format: the merged model (fp32) exported with `torch.onnx` (the dynamo exporter,
opset 18), inputs `input_ids` and `attention_mask` [batch, sequence] with dynamic sizes, one
output: `logits` (a causal LM or classifier) or `last_hidden_state` (a bare encoder). Weights
larger than protobuf's 2 GB limit go to `model.onnx.data` beside it. A causal LM is exported
without its KV cache: each step runs the whole sequence."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from qmerge.errors import ConfigError, ExportError
from qmerge.verbs.export.hf import write_config
from qmerge.verbs.export.job import Job
from qmerge.verbs.export.target import copy_side_files

OPSET = 18


class _Graph(nn.Module):
    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {"use_cache": False} if self.kind == "causal-lm" else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.last_hidden_state if self.kind == "encoder" else out.logits


def write(job: Job, out: Path) -> dict:
    if job.dtype != torch.float32:
        raise ConfigError(
            "the onnx export is fp32 (onnxruntime's CPU kernels are fp32); "
            "drop --dtype or use the int8 format for a smaller build"
        )
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the onnx format needs `onnx` and `onnxscript` (pip install onnx "
            "onnxscript; onnxruntime to run it)"
        ) from None
    graph = _Graph(job.merged_model(), job.target.kind).eval()
    ids = torch.randint(3, min(int(job.target.config.get("vocab_size", 100)), 1000), (2, 7))
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out_name = "last_hidden_state" if job.target.kind == "encoder" else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph,
                (ids, mask),
                None,
                input_names=["input_ids", "attention_mask"],
                output_names=[out_name],
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
                dynamic_shapes={
                    "input_ids": {0: batch, 1: seq},
                    "attention_mask": {0: batch, 1: seq},
                },
            )
        except Exception as e:  # the exporter raises many types; name the model and cause
            raise ExportError(
                f"torch.onnx could not export {job.target.arch}: "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            ) from None
    big = sum(p.numel() * 4 for p in graph.parameters()) > (1 << 30)
    program.save(str(out / "model.onnx"), external_data=big)
    copy_side_files(job.base, out)
    write_config(job, out)
    return {"opset": OPSET, "output": out_name, "external_data": big}
