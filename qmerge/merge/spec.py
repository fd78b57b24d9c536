"""Method spec strings, as codec specs are: "ties" or "ties:density=0.2,scale=1.0"."""

from __future__ import annotations

from typing import Any

from qmerge.errors import ConfigError
from qmerge.merge.base import make_config


def parse(spec: str) -> tuple[str, Any]:
    """`"name"` or `"name:key=value,..."` -> (method name, config)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"merge method spec {spec!r} is empty")
    name, _, rest = spec.strip().partition(":")
    values = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"merge method spec {spec!r}: {item!r} is not key=value")
        values[key.strip()] = value.strip()
    return name, make_config(name, values)
