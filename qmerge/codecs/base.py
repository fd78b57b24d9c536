"""What every codec shares: the residual container, the registry, and codec specs.

A codec is a frozen config dataclass (its fields documented, validated in `__post_init__`)
and a residual class with two verbs (STYLE.md, 9): `from_dense(delta, cfg)` compresses a
task-vector tensor, `dequantize(dtype)` gives the dense delta back. A residual names the
tensors it stores (`parts()`) and is rebuilt from them (`from_parts`), which is how packs
store it, and declares how it runs on the fused path (`runtime_form()`, runtime.py), so no
caller ever tests a codec's class or name. Codecs are looked up by name in `CODECS`, or from
a spec string such as `"lowrank:rank=32,factor_dtype=int8"` with `parse_spec`, which gives a
`CodecChoice` (name + config): specs are parsed once, where they enter.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from qmerge.codecs.runtime import DenseForm, Form
from qmerge.dtypes import FLOAT_DTYPES
from qmerge.errors import ConfigError, PackError
from qmerge.registry import Registry

__all__ = ["CODECS", "FLOAT_DTYPES", "Codec", "CodecChoice", "Residual"]


def as_matrix(t: Tensor) -> Tensor:
    """The 2-D view a codec works on: rows are dim 0 (output features); a vector is one row."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def check_choice(cls_name: str, field: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(
            f"{cls_name}.{field} must be one of {', '.join(map(str, choices))}; got {value!r}"
        )


_CHUNK = 1 << 20  # elements per block of the fp64 reductions below


def exact_sum(t: Tensor) -> float:
    """The sum of a tensor's values rounded once (math.fsum), so it does not depend on how
    many threads summed it (a distributed compress must write the same bytes and figures)."""
    return math.fsum(t.reshape(-1).double().tolist())


_RUN = 4096  # the most values of a row summed as one run: below torch's parallel grain size


def runs_per_row(cols: int) -> tuple[int, int]:
    """(run width, runs per row) of `sq_chunks` for rows of `cols` values."""
    width = min(cols, _RUN) or 1
    return width, -(-cols // width)


def sq_chunks(t: Tensor, minus: Tensor | None = None) -> Tensor:
    """fp64 sums of (t - minus)^2 over runs of each row of the matrix form (a row of `cols`
    values is cut into runs of at most `_RUN`; the last one is padded with zeros), row-major.
    A run is summed by one thread in a fixed order, and which runs exist depends only on the
    row, so the sums are the same at any thread count and for any slice of rows (a Ray unit
    that encodes some rows of an embedding). Blockwise over rows: no full fp64 temporary.
    The result is allocated first: small tensors left between the blocks' freed buffers pin
    them in glibc's heap (+196 MB over SmolLM2's embedding, measured)."""
    a = as_matrix(t)
    b = None if minus is None else as_matrix(minus)
    rows, cols = a.shape
    width, runs = runs_per_row(cols)
    out = torch.empty(rows * runs, dtype=torch.float64)
    step = max(1, _CHUNK // max(cols, 1))
    for i in range(0, rows, step):
        block = a[i : i + step].double()
        if b is not None:
            block -= b[i : i + step]
        block = block.pow_(2)
        if runs * width != cols:
            block = torch.nn.functional.pad(block, (0, runs * width - cols))
        n = block.shape[0] * runs
        torch.sum(
            block.reshape(-1, runs, width), -1, out=out[i * runs : i * runs + n].view(-1, runs)
        )
        del block
    return out


def sq_sum(t: Tensor, minus: Tensor | None = None) -> float:
    """sum((t - minus)^2), from `sq_chunks` rounded once: the same at any thread count (a
    local and a Ray compress write the same SQNR in the manifest)."""
    return exact_sum(sq_chunks(t, minus))


class Residual:
    """A compressed task-vector tensor. Subclasses set `codec` and implement the verbs.

    Class-level facts callers ask instead of testing the class:
        is_zero: the residual stores nothing and reads back as zero (skip).
        needs_shared: reading it needs the pack's shared delta, passed as the part `unified`
            (a mask over it, EMR); such a residual never encodes a shared delta itself.
        threads_matter: `from_dense` may give other bytes at another intra-op thread count
            (BLAS splits its sums by thread: the SVDs of low rank). A codec that keeps this
            False sums in fp64 or elementwise only; tests/verbs/test_executor.py holds it to
            that at 1 and 2 threads. A distributed compress runs such tensors with the
            coordinator's thread count (verbs/compress_units.py).
    """

    codec: ClassVar[str]
    is_zero: ClassVar[bool] = False
    needs_shared: ClassVar[bool] = False
    threads_matter: ClassVar[bool] = False
    shape: tuple[int, ...]

    @classmethod
    def plans(cls, cfg: Any) -> bool:
        """Whether this config spans tensors (a byte budget over a task): then `plan` runs
        over all of them first and its per-tensor keywords go to `from_dense`."""
        return False

    @classmethod
    def plan(cls, cfg: Any, deltas: Iterable[tuple[str, Tensor]]) -> dict[str, dict[str, Any]]:
        """tensor name -> keyword arguments of `from_dense` (e.g. the rank a budget gives it);
        `None` as a name's value means the tensor gets nothing (stored as skip). Runs
        `plan_item` on each delta as it comes (one alive at a time), then `plan_from`."""
        return cls.plan_from(cfg, [(n, cls.plan_item(cfg, d)) for n, d in deltas])

    @classmethod
    def plan_item(cls, cfg: Any, delta: Tensor) -> Any:
        """What `plan_from` needs of one tensor (small, plain data: a distributed compress
        computes it in the worker that reads the tensor and sends it to the coordinator)."""
        raise NotImplementedError

    @classmethod
    def plan_from(cls, cfg: Any, items: Sequence[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
        """The plan (as `plan`) from every tensor's `plan_item`, in the order given."""
        raise NotImplementedError

    def runtime_form(self) -> Form | None:
        """How the fused path applies this residual (runtime.py); None for a zero residual.
        The default is the dense delta: correct for any codec, but it holds fp32/dtype
        matrices, so a codec with a cheaper form declares it."""
        if self.is_zero:
            return None
        return DenseForm(as_matrix(self.dequantize(torch.float32)))

    @classmethod
    def from_dense(cls, delta: Tensor, cfg: Any, calib: Tensor | None = None) -> Residual:
        raise NotImplementedError

    @classmethod
    def from_parts(
        cls, parts: Mapping[str, Tensor], cfg: Any, shape: tuple[int, ...], info: Mapping[str, Any]
    ) -> Residual:
        raise NotImplementedError

    def parts(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """JSON-able facts fixed at encode time (the rank chosen, whether calibrated, ...)."""
        return {}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts().values())

    def error_energy(self, delta: Tensor) -> float:
        """sum((delta - dequantize())^2) in fp64 (`error_chunks` rounded once)."""
        return exact_sum(self.error_chunks(delta))

    def error_chunks(self, delta: Tensor) -> Tensor:
        """The error's `sq_chunks` (what slices of rows add up exactly)."""
        return sq_chunks(delta, self.dequantize(torch.float32))

    @classmethod
    def rows_independent(cls, cfg: Any) -> bool:
        """Whether each row of the matrix form is encoded from that row alone, every part
        having the rows as its first dimension: then slices of rows encoded apart and
        concatenated are the same bytes as the whole (a Ray unit can take some rows)."""
        return False


def sqnr_db(signal_energy: float, error_energy: float) -> float | None:
    """10 log10(signal / error); None when the error is zero (lossless) or the signal is."""
    if error_energy <= 0 or signal_energy <= 0:
        return None
    return 10 * math.log10(signal_energy / error_energy)


@dataclass(frozen=True)
class Codec:
    name: str
    config: type
    residual: type[Residual]


CODECS: Registry[Codec] = Registry("codec")


def register(name: str, config: type, summary: str = "", paper: str = ""):
    """Class decorator: registers a Residual subclass as codec `name` keyed by `config`."""

    def deco(cls: type[Residual]) -> type[Residual]:
        cls.codec = name
        CODECS.register(name, Codec(name, config, cls), summary, paper)
        return cls

    return deco


def codec(name: str) -> Codec:
    return CODECS.lookup(name)


class CodecChoice(NamedTuple):
    """A parsed codec spec: the codec's name ("auto" for the chooser) and its config."""

    name: str
    config: Any

    def __str__(self) -> str:
        values = ",".join(
            f"{k}={v}"
            for k, v in config_dict(self.config).items()
            if not isinstance(v, (tuple, list))
        )
        return f"{self.name}:{values}" if values else self.name


def _coerce(cls_name: str, field: str, hint: Any, raw: object) -> object:
    """Turns a spec-string or JSON value into the field's declared type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and raw in (None, "none", "None"):
        return None
    for t in options:
        if t is type(None):
            continue
        origin = typing.get_origin(t)
        if origin is typing.Literal:
            return raw  # checked by __post_init__
        if t is bool:
            if isinstance(raw, bool):
                return raw
            if raw in ("true", "1", "yes"):
                return True
            if raw in ("false", "0", "no"):
                return False
        elif t is int and not isinstance(raw, bool):
            try:
                if isinstance(raw, int) or (
                    isinstance(raw, str) and raw.strip().lstrip("-").isdigit()
                ):
                    return int(raw)
            except ValueError:
                pass
        elif t is float and not isinstance(raw, bool):
            try:
                return float(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
        elif t is str and isinstance(raw, str):
            return raw
    raise ConfigError(f"{cls_name}.{field}: {raw!r} is not a valid {hint}")


def build_config(cls: type, values: Mapping[str, object], what: str) -> Any:
    """A config dataclass from field values (strings from a spec, or JSON values); `what`
    names its owner in errors ("codec 'sign'", "merge method 'ties'")."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(
                f"{what} has no option {key!r}; options: {', '.join(sorted(fields)) or 'none'}"
            )
        kwargs[key] = _coerce(cls.__name__, key, hints[key], raw)
    return cls(**kwargs)


def key_values(items: Iterable[str], where: str) -> dict[str, str]:
    """["key=value", ...] -> {key: value}; the one parser of options written as text (spec
    strings, the CLI's --option). A key given twice is refused."""
    values: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{where}: {item!r} is not key=value")
        if key in values:
            raise ConfigError(f"{where}: {key!r} is given twice")
        values[key] = value.strip()
    return values


def split_spec(spec: str, what: str) -> tuple[str, dict[str, str]]:
    """`"name"` or `"name:key=value,key=value"` -> (name, {key: value})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{what} spec {spec!r} is empty")
    name, _, rest = spec.strip().partition(":")
    items = filter(None, (s.strip() for s in rest.split(",")))
    return name.strip(), key_values(items, f"{what} spec {spec!r}")


def make_config(name: str, values: Mapping[str, object]) -> Any:
    """The config of codec `name` from field values (strings from a spec, or JSON values)."""
    return build_config(codec(name).config, values, f"codec {name!r}")


def parse_spec(spec: str) -> CodecChoice:
    """`"name"` or `"name:key=value,key=value"` -> CodecChoice(codec name, config)."""
    name, values = split_spec(spec, "codec")
    return CodecChoice(name, make_config(name, values))


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_residual(entry: Mapping[str, Any], parts: Mapping[str, Tensor], where: str) -> Residual:
    """Rebuilds a residual from a pack's table entry and stored parts; PackError on mismatch."""
    try:
        c = codec(entry["codec"])
        cfg = make_config(entry["codec"], entry["config"])
        return c.residual.from_parts(parts, cfg, tuple(entry["shape"]), entry.get("info", {}))
    except PackError:
        raise
    except (ConfigError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise PackError(f"{where}: cannot be read as codec {entry.get('codec')!r}: {e}") from None


def expect_part(
    parts: Mapping[str, Tensor],
    name: str,
    shape: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    codec_name: str,
) -> Tensor:
    """A stored part with the expected shape and dtype, or ValueError saying what is wrong."""
    if name not in parts:
        raise ValueError(f"{codec_name} residual has no part '{name}'")
    t = parts[name]
    if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        raise ValueError(
            f"part '{name}' is {t.dtype} {list(t.shape)}, expected "
            f"{'/'.join(map(str, dtypes))} {list(shape)}"
        )
    return t
