"""Loading a pack onto a model (`load`) and fitting its router (`fit_router`): the model-level
verbs of routed inference (shared/DESIGN.md, "Runtime")."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from qmerge.codecs import Residual
from qmerge.codecs.skip import SkipResidual
from qmerge.errors import BaseMismatchError, CheckpointError, ConfigError
from qmerge.format.names import alignment
from qmerge.format.pack import Pack
from qmerge.format.safetensors_io import dtype_name, tensor_sha256
from qmerge.nn.features import resolve_layer
from qmerge.nn.patch import Patched, patch
from qmerge.routing import ROUTERS
from qmerge.verbs import router_store as store
from qmerge.verbs.packs import open_pack, residual, shared_residual

PathLike = str | os.PathLike
QUANTIZE = ("8bit", "4bit")


def check_model(model: nn.Module, pack: Pack, content: bool = True) -> None:
    """Refuses a model that is not the pack's base (BaseMismatchError naming the tensor).

    With content=False only names, shapes and dtypes are compared (a quantized base)."""
    expected = pack.base_fingerprint["tensors"]
    state = model.state_dict()
    _, rename = alignment(state, expected)
    have = {rename(k): v for k, v in state.items()}
    for name, e in sorted(expected.items()):
        t = have.get(name)
        if t is None:
            raise BaseMismatchError(
                f"the model has no tensor '{name}' that the pack's base has; "
                f"this is a different base"
            )
        if list(t.shape) != e["shape"]:
            if content:
                raise BaseMismatchError(
                    f"model tensor '{name}' is {list(t.shape)}, the pack's "
                    f"base had {e['shape']}; this is a different base"
                )
            continue
        if content and tensor_sha256(t.detach().cpu().contiguous()) != e["sha256"]:
            got = dtype_name(t.dtype)
            hint = (
                f" (the model holds {got}, the base was {e['dtype']}: load it in "
                f"{e['dtype']} or pass check_base='shapes')"
                if got != e["dtype"]
                else ""
            )
            raise BaseMismatchError(
                f"model tensor '{name}' has different values from the "
                f"pack's base{hint}; this is a different base"
            )


def _auto_class(base: Path, pack: Pack):
    import transformers

    try:
        cfg = json.loads((base / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{base}: no readable config.json ({e}); pass a model object instead"
        ) from None
    arch = " ".join(cfg.get("architectures") or [])
    if any(pack.manifest["tasks"][t].get("heads") for t in pack.tasks):
        return transformers.AutoModelForSequenceClassification
    if "CausalLM" in arch:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _from_pretrained(base: Path, pack: Pack, dtype, device, quantize: str | None) -> nn.Module:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "loading a base by path needs `transformers` (pip install "
            "transformers), or pass a model object"
        ) from None
    cls = _auto_class(base, pack)
    kwargs: dict = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    labels = [len(pack.labels(t) or []) for t in pack.tasks]
    if cls.__name__ == "AutoModelForSequenceClassification":
        kwargs["num_labels"] = max(max(labels), 2)
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantize == "8bit",
            load_in_4bit=quantize == "4bit",
            bnb_4bit_compute_dtype=dtype or torch.float32,
        )
        kwargs["device_map"] = device or "cpu"
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: heads come
    try:  # from the pack
        model = cls.from_pretrained(base, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if device is not None and quantize is None:
        model = model.to(device)
    return model.eval()


def load(
    base: PathLike | nn.Module,
    pack: PathLike | Pack,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    cache_bytes: int = 256 << 20,
    mode: str = "auto",
    min_rows: int = 64,
    check_base: bool | str = True,
    _only: Sequence[str] | None = None,
) -> nn.Module:
    """Patches a model with a pack's tasks, in place; returns the model.

    Args:
        base: the base model: a Hugging Face directory (loaded with the Auto class its config
            and the pack call for) or a model object (`PreTrainedModel` or any `nn.Module`
            whose parameter names are the base checkpoint's, up to a prefix).
        pack: a pack made from that base (refused otherwise).
        dtype, device: how to load a base given by path.
        quantize: '8bit' or '4bit': load the base quantized with bitsandbytes (by path).
        cache_bytes: bound of the merged-weight cache (the materialized path).
        mode: 'auto', 'fused' or 'materialized' (nn/runtime.py).
        min_rows: in 'auto', a batch of one task with at least this many token rows runs on
            a merged weight.
        check_base: True compares every base tensor's sha256; 'shapes' only names and shapes
            (a base already cast or quantized); False skips the check.

    The model then takes `task=`, `coeffs=`, `router=True` and `per_token=` in its forward and
    `generate`; `model.qmerge` is the handle (route(), features(), unload(), ...).
    """
    pk = pack if isinstance(pack, Pack) else open_pack(pack)
    if isinstance(base, nn.Module):
        model = base
        if isinstance(getattr(model, "qmerge", None), Patched):
            raise ConfigError("this model is already patched; call model.qmerge.unload() first")
        if check_base:
            check_model(model, pk, content=check_base is True)
    else:
        path = Path(base)
        if check_base:
            open_pack(pk.path, base=path)
        model = _from_pretrained(path, pk, dtype, device, quantize)

    def res(t: str, n: str) -> Residual:
        # _only (for export's check): the other tasks' residuals are never read, so memory
        # holds the selected tasks only; routing to another task then gives the bare base
        return residual(pk, t, n) if _only is None or t in _only else SkipResidual(())

    patch(
        model,
        pk,
        res,
        cache_bytes=cache_bytes,
        mode=mode,
        min_rows=min_rows,
        router=store.load(pk),
        shared=lambda n: shared_residual(pk, n),
    )
    return model


def unload(model: nn.Module) -> nn.Module:
    handle = getattr(model, "qmerge", None)
    if not isinstance(handle, Patched):
        raise ConfigError("this model is not patched by qmerge")
    return handle.unload()


def fit_router(
    model: nn.Module,
    examples: Mapping[str, Sequence],
    *,
    kind: str = "prototype",
    layer: int | None = None,
    pooling: str = "mean",
    mode: str = "top1",
    temperature: float | None = None,
    encode: Callable[[Sequence], dict] | None = None,
    save: bool = True,
    batch_size: int = 32,
    metric: str | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
):
    """Fits a router on a patched model's base features and (by default) saves it in the pack.

    Args:
        model: a model patched by `load`.
        examples: task -> example inputs (texts when `encode` is given, e.g. a tokenizer call;
            else dicts of model inputs). The prototype router uses them unlabeled within a
            task; the linear router as (features, task) pairs.
        kind: a registered router kind ('prototype' or 'linear'; routing/router.py ROUTERS).
        layer: the block whose output is the feature (default: 2/3 of the depth).
        metric: the prototype router's 'mahalanobis' (shared covariance, its default) or
            'cosine' (routing/prototype.py).
    """
    handle = getattr(model, "qmerge", None)
    if not isinstance(handle, Patched):
        raise ConfigError("fit_router needs a model patched by qmerge.load")
    router_cls = ROUTERS.lookup(kind)
    options = {} if metric is None else {"metric": metric}
    if bad := sorted(set(options) - set(router_cls.fit_options)):
        raise ConfigError(f"router kind {kind!r} takes no option {bad[0]!r}")
    if unknown := [t for t in examples if t not in handle.tasks]:
        raise ConfigError(
            f"examples name task {unknown[0]!r}, which the pack does not have "
            f"(tasks: {', '.join(handle.tasks)})"
        )
    layer = resolve_layer(model, layer)
    feats = {}
    for task in progress(list(examples)):
        items = list(examples[task])
        if not items:
            raise ConfigError(f"task {task!r} has no examples")
        rows = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            inputs = encode(chunk) if encode else _stack(chunk)
            rows.append(handle.features(inputs, layer, pooling))
        feats[task] = torch.cat(rows)
    router = router_cls.fit(feats, layer, mode, temperature, **options)
    counts = {t: int(f.shape[0]) for t, f in feats.items()}
    if save:
        entry = store.save(handle.pack.path, router, pooling, counts)
    else:
        entry = router.config() | {"pooling": pooling, "examples": counts}
    handle.router, handle.router_entry = router, entry
    return router


def _stack(items: Sequence) -> dict:
    if not all(isinstance(x, Mapping) for x in items):
        raise ConfigError(
            "examples must be dicts of model inputs, or pass encode= (e.g. a tokenizer) for texts"
        )
    return {k: torch.cat([x[k] for x in items]) for k in items[0]}
