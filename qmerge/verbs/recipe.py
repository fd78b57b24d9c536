"""mergekit recipes: a merge written in mergekit's YAML, read as a qmerge merge (and written
back with `to_mergekit`).

Read: `merge_method`, `base_model`, `models[].model` with `.parameters` (`weight`,
`density`, `gamma`, `epsilon`), the global `parameters` (`normalize`, `rescale`, `lambda`,
`int8_mask`, `t`, `filter_wise`), `dtype`, `out_dtype`, and `tokenizer_source` where it is the
base (a no-op). Each mergekit method maps onto a registered qmerge method with mergekit's
conventions (merge/gta.py): task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della and della_linear onto `gta`; linear, model_stock and slerp onto their
own. What qmerge cannot do is refused naming the key: `slices`, layer ranges, gradients or
filters over a parameter, another tokenizer, other methods.

qmerge always computes in fp32; mergekit computes in `dtype`. With `dtype: float32` the two
give the same weights (bench/merge_vs_mergekit.py); with bfloat16 mergekit's rounding differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qmerge.errors import ConfigError
from qmerge.merge.base import MethodChoice, choose

# mergekit method -> (sparsify, consensus, normalize default, rescale default)
GTA = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_linear": ("random", "none", False, True),
    "dare_ties": ("random", "sum", False, True),
    "breadcrumbs": ("outliers", "none", False, False),
    "breadcrumbs_ties": ("outliers", "sum", False, False),
    "della": ("magprune", "sum", True, True),
    "della_linear": ("magprune", "none", False, True),
}
METHODS = (*GTA, "linear", "model_stock", "slerp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_TOP |= {"tokenizer_source", "name"}
_REFUSED = {
    "slices": "slices (layer ranges from several models)",
    "tokenizer": "a tokenizer configuration",
    "chat_template": "a chat template",
    "modules": "per-module merges",
}
_MODEL_PARAMS = {"weight", "density", "gamma", "epsilon"}
_GLOBAL_PARAMS = {"normalize", "rescale", "lambda", "int8_mask", "t", "filter_wise"}


@dataclass
class Recipe:
    """A mergekit recipe as qmerge runs it: the method with its config, the base, and the
    models whose task vectors are merged (task name -> checkpoint), in the recipe's order."""

    path: Path
    mergekit_method: str
    choice: MethodChoice
    base: Path | None  # None: a recipe over a pack that names no base_model
    models: dict[str, Path]
    out_dtype: torch.dtype | None
    raw: dict = field(repr=False, default_factory=dict)


def _fail(path: Path, where: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {what}")


def _scalar(path: Path, where: str, v: Any) -> float | bool:
    if isinstance(v, bool) or isinstance(v, int | float):
        return v
    if isinstance(v, list | dict):
        raise _fail(path, where, "gradients or filters over a parameter are not supported")
    raise _fail(path, where, f"must be a number, got {v!r}")


def _model_path(path: Path, where: str, m: Any, pack: dict[str, Path] | None = None) -> Path:
    """A recipe's model as a local path; with `pack` (task -> source), a task name or a task's
    source path names that task (its source path is returned)."""
    if pack is not None and isinstance(m, str):
        for task, src in pack.items():
            if m == task or Path(m).expanduser().resolve() == src.resolve():
                return src
        raise _fail(path, where, f"{m!r} is no task of the pack ({', '.join(pack)})")
    if isinstance(m, dict) and isinstance(m.get("model"), str):
        m = m["model"]  # {model: {model: path}}: mergekit's long form, without a LoRA
    if not isinstance(m, str) or not m:
        raise _fail(path, where, f"must be a model path, got {m!r}")
    if "+" in m:
        raise _fail(
            path,
            where,
            "a model with a LoRA ('base+lora') is not supported; "
            "give the adapter to qmerge compress --task instead",
        )
    p = Path(m).expanduser()
    if not p.is_absolute():
        p = (path.parent / p) if (path.parent / p).exists() else p
    if not p.exists():
        raise _fail(path, where, f"{m}: no such local model (qmerge reads local checkpoints)")
    return p


def _task_names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", p.name)[:48] or "model"
        stem = stem if re.match(r"[A-Za-z]", stem) else f"m_{stem}"
        name, k = stem, 2
        while name in names or name == "base":
            name, k = f"{stem}_{k}", k + 1
        names.append(name)
    return names


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    return obj


def _check_keys(path: Path, raw: dict) -> None:
    for key in raw:
        if key in _REFUSED:
            raise _fail(path, key, f"{_REFUSED[key]} is not supported by qmerge")
        if key not in _TOP:
            raise _fail(path, key, f"unknown key; qmerge reads {', '.join(sorted(_TOP))}")
    tok = raw.get("tokenizer_source")
    if tok not in (None, "base"):
        raise _fail(path, "tokenizer_source", f"{tok!r}: only the base's tokenizer is kept")


def _models(path: Path, raw: dict, pack: dict[str, Path] | None) -> list[tuple[Path, dict]]:
    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise _fail(path, "models", "must be a non-empty list")
    out = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(m, dict) or "model" not in m:
            raise _fail(path, where, "must be a mapping with 'model'")
        if extra := sorted(set(m) - {"model", "parameters"}):
            raise _fail(path, f"{where}.{extra[0]}", "is not supported")
        params = m.get("parameters") or {}
        if not isinstance(params, dict):
            raise _fail(path, f"{where}.parameters", "must be a mapping")
        for k, v in params.items():
            if k not in _MODEL_PARAMS:
                raise _fail(path, f"{where}.parameters.{k}", "unknown model parameter")
            _scalar(path, f"{where}.parameters.{k}", v)
        out.append((_model_path(path, f"{where}.model", m["model"], pack), params))
    return out


def _global(path: Path, raw: dict) -> dict:
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(path, "parameters", "must be a mapping")
    for k, v in params.items():
        if k not in _GLOBAL_PARAMS:
            raise _fail(path, f"parameters.{k}", "unknown parameter")
        _scalar(path, f"parameters.{k}", v)
    return params


def _one(path: Path, key: str, values: list[float]) -> float:
    if len(set(values)) > 1:
        raise _fail(path, key, "qmerge takes one value for every model; they differ here")
    return values[0]


def _gta(path: Path, method: str, tasks: list[dict], g: dict) -> dict:
    sparsify, consensus, normalize, rescale = GTA[method]
    cfg: dict[str, Any] = {"sparsify": sparsify, "consensus": consensus}
    cfg["weights"] = "/".join(repr(float(p.get("weight", 1.0))) for p in tasks)
    cfg["densities"] = "/".join(repr(float(p.get("density", 1.0))) for p in tasks)
    if sparsify == "outliers":
        cfg["gamma"] = _one(path, "gamma", [float(p.get("gamma", 0.01)) for p in tasks])
    if sparsify == "magprune":
        cfg["epsilon"] = _one(path, "epsilon", [float(p.get("epsilon", 0.15)) for p in tasks])
    cfg["normalize"] = bool(g.get("normalize", normalize))
    cfg["rescale"] = bool(g.get("rescale", rescale))
    cfg["scale"] = float(g.get("lambda", 1.0))
    return cfg


def read(path: str | Path, pack: dict[str, str | Path] | None = None) -> Recipe:
    """Reads and checks a mergekit recipe (every model path must exist locally). With `pack`
    (a pack's task -> source checkpoint), the models name the pack's tasks (by name or
    source path), every task once; they come back in the pack's order, under its names."""
    path = Path(path)
    raw = load_yaml(path)
    _check_keys(path, raw)
    method = raw.get("merge_method")
    if method not in METHODS:
        raise _fail(path, "merge_method", f"{method!r}; qmerge runs {', '.join(METHODS)}")
    tasks_of = {t: Path(p) for t, p in pack.items()} if pack is not None else None
    models = _models(path, raw, tasks_of)
    g = _global(path, raw)
    base = _model_path(path, "base_model", raw["base_model"]) if raw.get("base_model") else None
    same = [
        i for i, (p, _) in enumerate(models) if base is not None and p.resolve() == base.resolve()
    ]
    base_weight = sum(float(models[i][1].get("weight", 1.0)) for i in same)
    tasks = [m for i, m in enumerate(models) if i not in same]
    if base is None and tasks_of is None:  # (over a pack, the pack's base is the base)
        if method not in ("linear",):
            raise _fail(path, "base_model", f"{method} needs a base model")
        base, base_weight, tasks = models[0][0], float(models[0][1].get("weight", 1.0)), models[1:]
    if not tasks:
        raise _fail(path, "models", "names no model besides the base")
    names = _task_names([p for p, _ in tasks])
    if tasks_of is not None:
        tasks, names = _pack_order(path, tasks, tasks_of)
    if method == "slerp":
        if len(tasks) != 1 or not same:
            raise _fail(path, "models", "slerp takes two models, one of them the base_model")
        cfg: dict[str, Any] = {"t": float(_scalar(path, "parameters.t", g.get("t", 0.5)))}
        name = "slerp"
    elif method == "linear":
        cfg = {
            "weights": "/".join(repr(float(p.get("weight", 1.0))) for _, p in tasks),
            "base_weight": base_weight,
            "normalize": bool(g.get("normalize", True)),
        }
        name = "linear"
    elif method == "model_stock":
        cfg, name = {"filter_wise": bool(g.get("filter_wise", False))}, "model_stock"
    else:
        cfg, name = _gta(path, method, [p for _, p in tasks], g), "gta"
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _fail(
            path,
            "out_dtype" if raw.get("out_dtype") else "dtype",
            f"{dtype!r}; one of {', '.join(DTYPES)}",
        )
    return Recipe(
        path,
        method,
        choose(name, cfg),
        base,
        dict(zip(names, (p for p, _ in tasks), strict=True)),
        DTYPES[dtype] if dtype else None,
        raw,
    )


def _pack_order(
    path: Path, tasks: list[tuple[Path, dict]], pack: dict[str, Path]
) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The recipe's models in the pack's task order, with the pack's task names."""
    by_src = {src: task for task, src in pack.items()}
    named = {by_src[p]: (p, q) for p, q in tasks}
    if len(named) != len(tasks) or set(named) != set(pack):
        missing = sorted(set(pack) - set(named))
        what = f"leaves out task {missing[0]!r}" if missing else "names a task twice"
        raise _fail(path, "models", f"{what}; a merge over a pack takes each of its tasks once")
    return [named[t] for t in pack], list(pack)


def _gta_name(cfg: Any) -> str:
    for name, (sparsify, consensus, _, _) in GTA.items():
        if (sparsify, consensus) == (cfg.sparsify, cfg.consensus):
            return name
    raise AssertionError(cfg)


def _mergekit_method(choice: MethodChoice, n: int) -> tuple[str, list[dict], dict]:
    """(mergekit method, per-model parameters, global parameters) of a qmerge method."""
    from qmerge.merge.gta import per_task

    name, cfg = choice.method.name, choice.config
    if name == "task_arithmetic":
        return "task_arithmetic", [{"weight": cfg.scale}] * n, {}
    if name == "ties":
        return "ties", [{"weight": 1.0, "density": cfg.density}] * n, {"lambda": cfg.scale}
    if name == "dare":
        method = "dare_linear" if cfg.combine == "task_arithmetic" else "dare_ties"
        per = [{"weight": 1.0, "density": 1 - cfg.drop}] * n
        return method, per, {"lambda": cfg.scale, "normalize": cfg.combine == "ties"}
    if name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "gta"):
        g = cfg if name == "gta" else cfg.gta(ties=not name.endswith(("crumbs", "linear")))
        weights = per_task(g.weights, n, 1.0, "weights")
        dens = per_task(g.densities, n, g.density, "densities")
        per = []
        for w, d in zip(weights, dens, strict=True):
            p = {"weight": w, "density": d}
            p |= {"gamma": g.gamma} if g.sparsify == "outliers" else {}
            p |= {"epsilon": g.epsilon} if g.sparsify == "magprune" else {}
            per.append(p)
        glob = {"normalize": g.normalize, "rescale": g.rescale, "lambda": g.scale}
        return _gta_name(g), per, glob
    if name == "linear":
        from qmerge.merge.gta import per_task as weights_of

        per = [{"weight": w} for w in weights_of(cfg.weights, n, 1.0, "weights")]
        if cfg.base_weight:
            raise ConfigError("linear with base_weight: list the base among the recipe's models")
        return "linear", per, {"normalize": cfg.normalize}
    if name == "model_stock":
        return "model_stock", [{}] * n, {"filter_wise": cfg.filter_wise}
    if name == "slerp":
        return "slerp", [{}] * n, {"t": cfg.t}
    raise ConfigError(f"merge method {name!r} has no mergekit equivalent")


def to_mergekit(choice: MethodChoice, base: str | Path, models: dict[str, str | Path]) -> dict:
    """The mergekit recipe of a qmerge merge over fine-tunes of `base` (task -> checkpoint).
    It runs the same merge in mergekit: equal weights for the deterministic methods (qmerge's
    own `ties` keeps every entry tied at its threshold where mergekit keeps exactly ⌊k·n⌋;
    `dare` rescales by 1/(1−p) where mergekit matches the L1 norm)."""
    method, per, glob = _mergekit_method(choice, len(models))
    entries = [
        {"model": str(p), **({"parameters": dict(q)} if q else {})}
        for p, q in zip(models.values(), per, strict=True)
    ]
    if method == "slerp":
        if len(entries) != 1:
            raise ConfigError("slerp as a mergekit recipe takes one task (the base is the other)")
        entries.insert(0, {"model": str(base)})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": entries,
        "parameters": glob,
        "dtype": "float32",
    }


def write_yaml(obj: dict, path: str | Path) -> None:
    import yaml

    from qmerge.format.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(obj, sort_keys=False).encode())
