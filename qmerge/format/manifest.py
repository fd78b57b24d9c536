"""manifest.json: its schema, strict validation, and deterministic serialisation.

    {
      "format_version": 1,
      "generator": "qmerge 0.1.0",
      "base": {"structure": sha256, "content": sha256,
               "tensors": {name: {"dtype", "shape", "sha256"}}},          # see fingerprint.py
      "tasks": {task: {"file": "tasks/<task>.safetensors", "source": str,
                       "tensors": {name: ENTRY},
                       "heads": {name: {"shape", "dtype", "bytes"}},   # optional: task-only
                       "labels": [str]}},                              # optional: class names
      "files": {relative path: {"sha256": hex, "bytes": int}},   # every file but this one
      "merge": null | {"method": str, "config": {...}, "source": str,   # verbs/merge.py
                       "file": "shared.safetensors", "tensors": {name: ENTRY}},
      "router": null | {"kind", "file": "router.safetensors", ...}   # verbs/router_store.py
    }
    ENTRY = {"codec": str, "config": {...}, "module_type": str, "shape": [int], "dtype": str,
             "params": int, "bytes": int, "bits_per_param": float, "sqnr_db": float | null,
             "info": {...}, "extra_rows": int (optional, rows beyond the base's, stored dense)}

Written only by writer.py. `validate` accepts only this shape: a manifest from a stranger
cannot name a file outside the pack, and any fault is a `PackError` that says where it is.
"""

from __future__ import annotations

import json
import math
import re

from qmerge.errors import FormatVersionError, PackError

FORMAT_VERSION = 1
NAME = "manifest.json"
# A manifest names every tensor of every task: about 300 bytes an entry, so 64 MiB holds
# 200,000 entries. A bigger one is refused unread (1 GB of JSON took 2.3 GB to parse).
MAX_MANIFEST_BYTES = 64 << 20
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FRAGMENTS_DIR = ".fragments"  # + "-<pid>-<hex>": a distributed step's scratch in a pack
SHARED_FILE = "shared.safetensors"
ROUTER_FILE = "router.safetensors"
OPTIONAL_FILES = (SHARED_FILE, ROUTER_FILE)


def task_file(task: str) -> str:
    return f"tasks/{task}.safetensors"


def check_task_name(task: str) -> None:
    if not isinstance(task, str) or not TASK_NAME.match(task):
        raise PackError(
            f"task name {task!r} is not valid: use 1-128 letters, digits, '_', '.', "
            f"'+' or '-', starting with a letter or digit"
        )


# Words of the route grammar (routing/route.py: BASE, AUTO, mixtures "a:0.5+b:0.5"): a new task
# named so could never be asked for by name. Packs that already hold such a name still open.
RESERVED_TASK_NAMES = ("base", "auto")


def check_new_task_name(task: str) -> None:
    """A name for a task being added: valid, not a route word, no '+' (the mixture separator)."""
    check_task_name(task)
    if task.lower() in RESERVED_TASK_NAMES or "+" in task:
        raise PackError(
            f"task name {task!r} is reserved by the route grammar ('base', 'auto' and names "
            f"with '+' mean something else in a request); choose another name"
        )


def new(base_fingerprint: dict, generator: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "generator": generator,
        "base": base_fingerprint,
        "tasks": {},
        "files": {},
        "merge": None,
        "router": None,
    }


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise PackError(f"manifest.json: {where}: {msg}")


def _is_int(v: object, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _shape(v: object) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(_is_int(d) for d in v)


def _number_or_null(v: object) -> bool:
    return v is None or (type(v) in (int, float) and math.isfinite(v))


def _entry(where: str, e: object) -> None:
    _need(isinstance(e, dict), where, "is not an object")
    assert isinstance(e, dict)
    for key in (
        "codec",
        "config",
        "module_type",
        "shape",
        "dtype",
        "params",
        "bytes",
        "bits_per_param",
        "sqnr_db",
    ):
        _need(key in e, f"{where}.{key}", "is missing")
    for key, ok in (
        ("codec", isinstance(e.get("codec"), str)),
        ("config", isinstance(e.get("config"), dict)),
        ("module_type", isinstance(e.get("module_type"), str)),
        ("shape", _shape(e.get("shape"))),
        ("dtype", isinstance(e.get("dtype"), str)),
        ("params", _is_int(e.get("params"))),
        ("bytes", _is_int(e.get("bytes"))),
        ("bits_per_param", _number_or_null(e.get("bits_per_param"))),
        ("sqnr_db", _number_or_null(e.get("sqnr_db"))),
        ("info", isinstance(e.get("info", {}), dict)),
        ("extra_rows", _is_int(e.get("extra_rows", 0))),
    ):
        _need(ok, f"{where}.{key}", f"is missing or has the wrong type ({e.get(key)!r})")


def validate(obj: object) -> dict:
    """Returns `obj` if it is a manifest this qmerge can read; raises PackError otherwise."""
    _need(isinstance(obj, dict), "top level", "is not a JSON object")
    assert isinstance(obj, dict)
    version = obj.get("format_version")
    _need(_is_int(version, 1), "format_version", f"must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"manifest.json: format_version {version} is newer than this qmerge reads "
            f"({FORMAT_VERSION}); upgrade qmerge"
        )
    tensors = _base(obj.get("base"))
    files = _files(obj.get("files"))
    tasks = obj.get("tasks")
    _need(isinstance(tasks, dict), "tasks", "is missing or not an object")
    for name, task in tasks.items():
        _task(name, task, tensors, files)
    for key in ("merge", "router"):
        _need(obj.get(key) is None or isinstance(obj.get(key), dict), key, "is not null or object")
    if obj.get("merge") is not None:
        _merge(obj["merge"], tensors, files)
    _need(isinstance(obj.get("generator", ""), str), "generator", "is not a string")
    return obj


def _hex(v: object) -> bool:
    return isinstance(v, str) and bool(_HEX64.match(v))


def _base(base: object) -> dict:
    """The base fingerprint's tensors, checked."""
    _need(isinstance(base, dict), "base", "is missing or not an object")
    assert isinstance(base, dict)
    for key in ("structure", "content"):
        _need(_hex(base.get(key)), f"base.{key}", "is not a sha256 hex digest")
    tensors = base.get("tensors")
    _need(isinstance(tensors, dict), "base.tensors", "is missing or not an object")
    for n, t in tensors.items():
        _need(
            isinstance(t, dict)
            and isinstance(t.get("dtype"), str)
            and _shape(t.get("shape"))
            and _hex(t.get("sha256")),
            f"base.tensors[{n!r}]",
            "needs dtype, shape and sha256",
        )
    return tensors


def _files(files: object) -> dict:
    _need(isinstance(files, dict), "files", "is missing or not an object")
    assert isinstance(files, dict)
    for path, f in files.items():
        in_tasks = (
            path.startswith("tasks/")
            and path.endswith(".safetensors")
            and TASK_NAME.match(path[6:-12]) is not None
        )
        _need(path in OPTIONAL_FILES or in_tasks, f"files[{path!r}]", "is not a file a pack holds")
        _need(
            isinstance(f, dict) and _hex(f.get("sha256")) and _is_int(f.get("bytes")),
            f"files[{path!r}]",
            "needs sha256 and bytes",
        )
    return files


def _task(name: str, task: object, tensors: dict, files: dict) -> None:
    where = f"tasks[{name!r}]"
    _need(TASK_NAME.match(name) is not None, where, "is not a valid task name")
    _need(isinstance(task, dict), where, "is not an object")
    assert isinstance(task, dict)
    _need(
        task.get("file") == task_file(name),
        f"{where}.file",
        f"must be {task_file(name)!r}, got {task.get('file')!r}",
    )
    _need(task_file(name) in files, f"{where}.file", "has no entry in 'files'")
    _need(isinstance(task.get("source", ""), str), f"{where}.source", "not a string")
    entries = task.get("tensors")
    _need(isinstance(entries, dict), f"{where}.tensors", "is missing or not an object")
    for tname, e in entries.items():
        _entry(f"{where}.tensors[{tname!r}]", e)
        _need(tname in tensors, f"{where}.tensors[{tname!r}]", "names no base tensor")
    heads = task.get("heads", {})
    _need(isinstance(heads, dict), f"{where}.heads", "is not an object")
    for hname, h in heads.items():
        _need(
            isinstance(h, dict)
            and _shape(h.get("shape"))
            and isinstance(h.get("dtype"), str)
            and _is_int(h.get("bytes")),
            f"{where}.heads[{hname!r}]",
            "needs shape, dtype and bytes",
        )
        _need(hname not in entries, f"{where}.heads[{hname!r}]", "is also a residual")
    labels = task.get("labels", [])
    _need(
        isinstance(labels, list) and all(isinstance(x, str) for x in labels),
        f"{where}.labels",
        "is not a list of strings",
    )


def _merge(merge: dict, tensors: dict, files: dict) -> None:
    _need(isinstance(merge.get("method"), str), "merge.method", "is missing or not a string")
    shared = merge.get("tensors", {})
    _need(isinstance(shared, dict), "merge.tensors", "is not an object")
    if shared:
        _need(merge.get("file") == SHARED_FILE, "merge.file", f"must be {SHARED_FILE!r}")
        _need(SHARED_FILE in files, "merge.file", "has no entry in 'files'")
    for tname, e in shared.items():
        _entry(f"merge.tensors[{tname!r}]", e)
        _need(tname in tensors, f"merge.tensors[{tname!r}]", "names no base tensor")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text} is out of range")
    return v


def loads(raw: bytes) -> dict:
    try:
        obj = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise PackError(f"manifest.json: is not valid JSON ({e})") from None
    return validate(obj)
