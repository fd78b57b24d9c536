"""Routers inside a pack: `router.safetensors` holds the tensors, the manifest's "router" entry
the rest:

    "router": {"kind": "prototype" | "linear", "file": "router.safetensors",
               "tasks": [str], "layer": int, "pooling": "mean", "mode": "top1" | "softmax",
               "temperature": float, "examples": {task: int},
               "metric": "mahalanobis" | "cosine", "shrinkage": float}   (prototype only;
                                                    no metric: cosine, as first saved)

Saving writes the file atomically, then the manifest, under the pack's lock (the order
format/pack.py uses for task files), so an interrupted save leaves the old router.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from qmerge.errors import ConfigError, PackError
from qmerge.format import manifest as mf
from qmerge.format.atomic import atomic_file
from qmerge.format.pack import Pack, locked, write_manifest
from qmerge.format.safetensors_io import write_safetensors
from qmerge.routing.router import MODES, ROUTERS, Router

FILE = "router.safetensors"
POOLINGS = ("mean", "last")


def save(pack: str | os.PathLike, router: Router, pooling: str = "mean",
         examples: dict[str, int] | None = None) -> dict:
    """Stores `router` in the pack (replacing any router there); returns the manifest entry."""
    path = Path(pack)
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    with locked(path):
        current = Pack.open(path)
        if unknown := [t for t in router.tasks if t not in current.tasks]:
            raise ConfigError(f"{path}: the router names task {unknown[0]!r}, which the pack "
                              f"does not have")
        with atomic_file(path / FILE) as f:
            nbytes, sha = write_safetensors(f, router.tensors(),
                                            {"qmerge.format": "router", "kind": router.kind})
        manifest = current.manifest
        manifest["files"][FILE] = {"sha256": sha, "bytes": nbytes}
        entry = router.config() | {"file": FILE, "pooling": pooling,
                                   "examples": dict(examples or {})}
        manifest["router"] = entry
        write_manifest(path, manifest)
    return entry


def _check(entry: dict, pack: Pack) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PackError(f"{pack.path / mf.NAME}: router.{what}")
    need(entry.get("kind") in ROUTERS, f"kind must be one of {', '.join(ROUTERS)}, got "
         f"{entry.get('kind')!r}")
    need(entry.get("file") == FILE and FILE in pack.manifest["files"],
         f"file must be {FILE!r} and listed in 'files'")
    tasks = entry.get("tasks")
    need(isinstance(tasks, list) and len(tasks) > 0 and all(isinstance(t, str) for t in tasks)
         and len(set(tasks)) == len(tasks), "tasks must be a list of distinct task names")
    need(type(entry.get("layer")) is int, "layer must be an integer")
    need(entry.get("pooling") in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}")
    need(entry.get("mode") in MODES, f"mode must be one of {', '.join(MODES)}")
    temp = entry.get("temperature")
    need(type(temp) in (int, float) and math.isfinite(temp) and temp > 0,
         "temperature must be a positive number")


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
    path = Path(pack)
    with locked(path):
        current = Pack.open(path)
        manifest = current.manifest
        manifest["router"] = None
        manifest["files"].pop(FILE, None)
        write_manifest(path, manifest)
        (path / FILE).unlink(missing_ok=True)
