"""Routers inside a pack: `router.safetensors` holds the tensors, the manifest's "router" entry
the rest:

    "router": {"kind": "prototype" | "linear", "file": "router.safetensors",
               "tasks": [str], "layer": int, "pooling": "mean", "mode": "top1" | "softmax",
               "temperature": float, "examples": {task: int},
               "metric": "mahalanobis" | "cosine", "shrinkage": float}   (prototype only;
                                                    no metric: cosine, as first saved)

Saving and removing go through the pack writer (format/writer.py): the file atomically, then
the manifest, under the pack's lock, so an interrupted save leaves the old router.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from qmerge.errors import ConfigError, PackError
from qmerge.format import manifest as mf
from qmerge.format.pack import Pack
from qmerge.format.writer import PackWriter
from qmerge.routing.router import MODES, ROUTERS, Router

FILE = mf.ROUTER_FILE
POOLINGS = ("mean", "last")


def save(
    pack: str | os.PathLike,
    router: Router,
    pooling: str = "mean",
    examples: dict[str, int] | None = None,
) -> dict:
    """Stores `router` in the pack (replacing any router there); returns the manifest entry."""
    path = Path(pack)
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    with PackWriter.edit(path) as w:
        if unknown := [t for t in router.tasks if t not in w.manifest["tasks"]]:
            raise ConfigError(
                f"{path}: the router names task {unknown[0]!r}, which the pack does not have"
            )
        entry = w.set_router(
            router.tensors(),
            router.config() | {"pooling": pooling, "examples": dict(examples or {})},
        )
    return entry


def _check(entry: dict, pack: Pack) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PackError(f"{pack.path / mf.NAME}: router.{what}")

    need(
        entry.get("kind") in ROUTERS,
        f"kind must be one of {', '.join(ROUTERS)}, got {entry.get('kind')!r}",
    )
    need(
        entry.get("file") == FILE and FILE in pack.manifest["files"],
        f"file must be {FILE!r} and listed in 'files'",
    )
    tasks = entry.get("tasks")
    need(
        isinstance(tasks, list)
        and len(tasks) > 0
        and all(isinstance(t, str) for t in tasks)
        and len(set(tasks)) == len(tasks),
        "tasks must be a list of distinct task names",
    )
    need(type(entry.get("layer")) is int, "layer must be an integer")
    need(entry.get("pooling") in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}")
    need(entry.get("mode") in MODES, f"mode must be one of {', '.join(MODES)}")
    temp = entry.get("temperature")
    need(
        type(temp) in (int, float) and math.isfinite(temp) and temp > 0,
        "temperature must be a positive number",
    )


def load(pack: Pack) -> tuple[Router, dict] | None:
    """The pack's router and its manifest entry, or None if it has none."""
    entry = pack.manifest.get("router")
    if entry is None:
        return None
    _check(entry, pack)
    f = pack.check_file(FILE, full_hash=True)
    tensors = {k: f.get(k) for k in f.keys()}
    try:
        router = ROUTERS[entry["kind"]].from_saved(entry, tensors)
    except ConfigError as e:
        raise PackError(f"{pack.path / FILE}: {e}") from None
    return router, entry


def remove(pack: str | os.PathLike) -> None:
    """Drops the pack's router (the manifest first, then the file)."""
    with PackWriter.edit(Path(pack)) as w:
        w.clear_router()
