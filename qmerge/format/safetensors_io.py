"""Reading and writing the safetensors format without pickle and without loading a whole file.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length `n`,
`n` bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`, then the tensor bytes; offsets are relative to the end of the header and tile
the data without gaps.

`SafetensorsFile` memory-maps the file copy-on-write: `get()` returns a tensor over the file's
pages, so reading a multi-GB checkpoint costs page cache, not process memory. Every structural
fault (short file, bad JSON, offsets outside the file, a shape that does not match its bytes)
raises the error class the caller passes, naming the file and the tensor.

`write_safetensors` streams tensors to an open file one at a time, hashing as it writes, in a
fixed order (wider dtypes first so every tensor stays aligned, then by name): the same tensors
always give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from qmerge.errors import QmergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise QmergeError(f"dtype {dtype} cannot be stored in safetensors") from None


class SafetensorsFile:
    """A read-only, memory-mapped view of one safetensors file."""

    def __init__(self, path: str | os.PathLike, error: type[QmergeError] = QmergeError):
        self.path = Path(path)
        self._error = error
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    self._fail(f"is truncated: {size} bytes, shorter than the 8-byte header length")
                n = int.from_bytes(head, "little")
                if n > min(MAX_HEADER, size - 8):
                    self._fail(
                        f"is truncated or not safetensors: header length {n} but the file "
                        f"has {size} bytes"
                    )
                raw = f.read(n)
                self._mm = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
                )
        except OSError as e:
            raise error(f"{self.path}: cannot read: {e.strerror or e}") from None
        self.nbytes = size
        self._data_start = 8 + n
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            self._fail(f"has a header that is not valid JSON ({e or 'nested too deeply'})")
        if not isinstance(header, dict):
            self._fail("has a header that is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            self._fail("has '__metadata__' that is not a map of strings")
        self.metadata: dict[str, str] = meta
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            self._entries[name] = self._entry(name, e)
            spans.append(self._entries[name][2:])
        end = 0
        for begin, stop in sorted(spans):
            if begin != end:
                self._fail(f"has tensor data that overlaps or leaves a gap at byte {begin}")
            end = stop
        if self._data_start + end != size:
            self._fail(
                f"is truncated or has trailing bytes: its tensors end at byte "
                f"{self._data_start + end}, the file has {size}"
            )

    def _fail(self, msg: str):
        raise self._error(f"{self.path}: {msg}")

    def _entry(self, name: str, e: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if not isinstance(e, dict):
            self._fail(f"tensor '{name}': entry is not a JSON object")
        dtype = DTYPES.get(e.get("dtype"))  # type: ignore[arg-type]
        shape, offs = e.get("shape"), e.get("data_offsets")
        if dtype is None:
            self._fail(f"tensor '{name}': unknown dtype {e.get('dtype')!r}")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            # (a dimension past int64 cannot be a tensor's, even an empty one's)
            self._fail(f"tensor '{name}': shape {shape!r} is not a list of non-negative ints")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1]
        ):
            self._fail(f"tensor '{name}': data_offsets {offs!r} are not [begin, end]")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offs[1] - offs[0] != math.prod(shape) * itemsize:
            self._fail(
                f"tensor '{name}': {offs[1] - offs[0]} bytes do not hold shape {shape} "
                f"of {e['dtype']}"
            )
        return dtype, tuple(shape), offs[0], offs[1]

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> Tensor:
        """The tensor, backed by the file's pages (writes stay private to this process)."""
        if name not in self._entries:
            self._fail(f"has no tensor '{name}'")
        dtype, shape, begin, end = self._entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(
            self._mm, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin
        )
        return t.view(dtype).reshape(shape)


def _raw(t: Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _order(specs: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> list[int]:
    """Where each tensor goes: larger elements first, then by name (8-byte alignment)."""
    return sorted(range(len(specs)), key=lambda i: (-specs[i][1].itemsize, specs[i][0]))


def header_bytes(
    specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[str]]:
    """The length prefix and JSON header of a file holding tensors (name, dtype, shape), and
    the order their bytes must follow."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    order = _order(specs)
    for i in order:
        name, dt, shape = specs[i]
        size = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": dtype_name(dt),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, [specs[i][0] for i in order]


def write_header(
    f: BinaryIO,
    specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Starts a safetensors file whose tensors are written next, one at a time, in the
    returned order (`write_tensor`): a file streamed without holding its tensors."""
    head, order = header_bytes(specs, metadata)
    f.write(head)
    return order


def write_tensor(f: BinaryIO, t: Tensor) -> memoryview:
    """Appends one tensor's bytes (after `write_header`); returns them."""
    data = _raw(t)
    f.write(data)
    return data


def write_safetensors(
    f: BinaryIO, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Writes `tensors` to the open file `f`; returns (bytes written, sha256 hex)."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    head, order = header_bytes(specs, metadata)
    f.write(head)
    h = hashlib.sha256(head)
    total = len(head)
    for name in order:
        data = write_tensor(f, tensors[name])
        h.update(data)
        total += len(data)
    return total, h.hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (zero-copy for contiguous CPU tensors)."""
    h = hashlib.sha256(f"{dtype_name(t.dtype)}{list(t.shape)}".encode())
    h.update(_raw(t))
    return h.hexdigest()
