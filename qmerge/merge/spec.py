"""Method spec strings, as codec specs are: "ties" or "ties:density=0.2,scale=1.0"."""

from __future__ import annotations

from typing import Any

from qmerge.codecs.base import split_spec
from qmerge.merge.base import make_config


def parse(spec: str) -> tuple[str, Any]:
    """`"name"` or `"name:key=value,..."` -> (method name, config)."""
    name, values = split_spec(spec, "merge method")
    return name, make_config(name, values)
