"""Loads a qmerge `int8` export (copied into the export as qmerge_int8.py; needs only torch,
transformers and safetensors, not qmerge).

    import qmerge_int8
    model = qmerge_int8.load("export_dir")          # a transformers model, eval mode
    model.generate(...) / model(...)                  # as the original class

The export holds the merged model with every Linear and Embedding weight (task heads aside)
as int8 with one fp32 scale per output channel (per row: W ~= q * scale[:, None], symmetric,
absmax / 127), and the other tensors (norms, biases, heads) in floating point, in
`model.int8.safetensors`: a quantized weight `name` sits beside `name.int8_scale`. Weights stay
int8 in memory; a layer dequantizes its weight when it runs. The model is built with its
parameters on the meta device, so loading never allocates the floating-point model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS = "model.int8.safetensors"
SCALE = ".int8_scale"


class Int8Linear(nn.Module):
    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class Int8Embedding(nn.Module):
    def __init__(self, qweight: Tensor, scale: Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: Tensor) -> Tensor:
        return self.qweight[ids].float() * self.scale[ids][..., None]


@contextlib.contextmanager
def _params_on_meta():
    """Modules built inside put their parameters on the meta device (buffers stay real), so
    building the model allocates one parameter at a time, briefly."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load(directory: str | Path) -> nn.Module:
    import transformers
    from safetensors.torch import load_file

    d = Path(directory)
    config = transformers.AutoConfig.from_pretrained(d)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise ValueError(f"{d / 'config.json'}: names no transformers class in architectures")
    state = load_file(str(d / WEIGHTS))
    with _params_on_meta():
        model = cls(config)
    modules = dict(model.named_modules())
    quantized = sorted(k[: -len(SCALE)] for k in state if k.endswith(SCALE))
    made: dict[str, nn.Module] = {}
    for name in quantized:
        path = name.rpartition(".")[0]
        old = modules.get(path)
        q, s = state.pop(name), state.pop(name + SCALE)
        if isinstance(old, nn.Embedding):
            made[path] = Int8Embedding(q, s, old.padding_idx)
        elif isinstance(old, nn.Linear):
            made[path] = Int8Linear(q, s, state.pop(f"{path}.bias", None))
        else:
            raise ValueError(
                f"{d / WEIGHTS}: '{name}' is quantized but '{path}' is a "
                f"{type(old).__name__}, not a Linear or Embedding"
            )
        _set(model, path, made[path])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and isinstance(out_emb, nn.Linear) and out_emb.weight.is_meta:
        inp = model.get_input_embeddings()
        if not isinstance(inp, Int8Embedding) or not getattr(config, "tie_word_embeddings", False):
            raise ValueError(
                f"{d / WEIGHTS}: has no output-embedding weight and the model does "
                f"not tie it to a quantized input embedding"
            )
        path = next(p for p, m in model.named_modules() if m is out_emb)
        _set(
            model,
            path,
            Int8Linear(inp.qweight, inp.scale, None if out_emb.bias is None else out_emb.bias),
        )
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{d / WEIGHTS}: holds no value for '{left[0]}' ({len(left)} missing)")
    gen = d / "generation_config.json"
    if gen.exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(d)
    return model.eval()
