"""Method spec strings, as codec specs are: "ties" or "ties:density=0.2,scale=1.0"."""

from __future__ import annotations

from typing import Any

from qmerge.codecs.base import split_spec
from qmerge.merge.base import MethodChoice, choose


def parse(spec: str | MethodChoice, config: Any = None) -> MethodChoice:
    """`"name"` or `"name:key=value,..."` (or a name and its config dataclass) -> the method
    and its config. A MethodChoice passes through as it is."""
    if isinstance(spec, MethodChoice):
        return spec
    if config is not None:
        return choose(spec, config)
    name, values = split_spec(spec, "merge method")
    return choose(name, values)


def static(spec: str, owner: str) -> MethodChoice:
    """An inner merge spec of another method (LiNeS, Twin): it must be a static merge."""
    choice = parse(spec)
    if not choice.method.static:
        from qmerge.errors import ConfigError

        raise ConfigError(
            f"{owner} must be a static merge (one without per-task parts); got "
            f"{choice.method.name!r}"
        )
    return choice
