"""A pack on disk: `manifest.json` + one safetensors file per task (shared/DESIGN.md, "The pack").

`Pack.open` reads and validates only the manifest; a task's file is memory-mapped the first
time one of its tensors is asked for, after its size and sha256 are checked against the
manifest (`verify_files=False` skips the hash, not the size). Tensors of a task file are keyed
`"<base tensor name>:<part>"`, the parts being the codec's (`signs`, `scales`, `U`, ...).

Writing is writer.py's alone: a task file is written atomically under its final name (which
the current manifest does not reference), then the manifest is replaced atomically. A crash
leaves either the old manifest with a stray file, which `verify` reports, or the new one with
everything it names.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from torch import Tensor

from qmerge.errors import ChecksumError, PackError
from qmerge.format import manifest as mf
from qmerge.format.fingerprint import compare
from qmerge.format.safetensors_io import SafetensorsFile, sha256_file

PART_SEP = ":"


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}{PART_SEP}{part}"


_STAGED = re.compile(r"-(\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def regular_size(pack: Path, rel: str) -> int:
    """The size of pack file `rel`, once it and every directory above it inside the pack are
    plain (no symbolic link out of the pack, no FIFO or device that would hang a read)."""
    p = pack
    for part in Path(rel).parts:
        p = p / part
        try:
            st = os.lstat(p)
        except OSError:
            raise ChecksumError(f"{p}: is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise PackError(f"{p}: is a symbolic link; a pack holds only its own files")
    if not stat.S_ISREG(st.st_mode):
        raise PackError(f"{p}: is not a regular file")
    return st.st_size


class Pack:
    """A pack opened for reading. `manifest` is the validated manifest (do not mutate)."""

    def __init__(self, path: Path, manifest: dict, verify_files: bool = True):
        self.path = path
        self.manifest = manifest
        self._verify_files = verify_files
        self._files: dict[str, SafetensorsFile] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, verify_files: bool = True) -> Pack:
        path = Path(path)
        if not (path / mf.NAME).is_file():
            raise PackError(f"{path}: not a pack (no {mf.NAME})")
        try:
            size = regular_size(path, mf.NAME)
            if size > mf.MAX_MANIFEST_BYTES:
                raise PackError(
                    f"{path / mf.NAME}: is {size} bytes, over the {mf.MAX_MANIFEST_BYTES} a "
                    f"manifest may have"
                )
            raw = (path / mf.NAME).read_bytes()
        except OSError as e:
            raise PackError(f"{path / mf.NAME}: cannot read: {e.strerror or e}") from None
        return cls(path, mf.loads(raw), verify_files)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.manifest["tasks"])

    @property
    def base_fingerprint(self) -> dict:
        return self.manifest["base"]

    def entries(self, task: str) -> dict[str, dict]:
        """The codec table of `task`: base tensor name -> entry (see manifest.py)."""
        if task not in self.manifest["tasks"]:
            raise PackError(f"{self.path}: no task {task!r} (tasks: {', '.join(self.tasks)})")
        return self.manifest["tasks"][task]["tensors"]

    def check_base(self, fingerprint: dict, what: str = "") -> None:
        """Raises BaseMismatchError unless `fingerprint` is this pack's base."""
        compare(self.base_fingerprint, fingerprint, what or str(self.path))

    def check_file(self, rel: str, full_hash: bool = True) -> SafetensorsFile:
        """Opens a pack file after checking its size (and sha256) against the manifest."""
        want = self.manifest["files"].get(rel)
        if want is None:
            raise PackError(f"{self.path}: manifest lists no file {rel}")
        p = self.path / rel
        size = regular_size(self.path, rel)
        if size != want["bytes"]:
            raise ChecksumError(
                f"{p}: is truncated or overwritten: {size} bytes, the manifest says {want['bytes']}"
            )
        if full_hash and (got := sha256_file(p)) != want["sha256"]:
            raise ChecksumError(
                f"{p}: is corrupted: sha256 {got[:16]}... differs from the "
                f"manifest's {want['sha256'][:16]}..."
            )
        return SafetensorsFile(p, error=ChecksumError if full_hash else PackError)

    def task_file(self, task: str) -> SafetensorsFile:
        self.entries(task)
        if task not in self._files:
            self._files[task] = self.check_file(mf.task_file(task), self._verify_files)
        return self._files[task]

    def parts(self, task: str, tensor: str) -> dict[str, Tensor]:
        """The stored tensors of one residual, by part name, memory-mapped."""
        entries = self.entries(task)
        if tensor not in entries:
            raise PackError(f"{self.path}: task {task!r} has no tensor '{tensor}'")
        f = self.task_file(task)
        prefix = tensor + PART_SEP
        return {k[len(prefix) :]: f.get(k) for k in f.keys() if k.startswith(prefix)}

    def close(self) -> None:
        """Forgets the opened task files (their maps go once no tensor refers to them)."""
        self._files.clear()

    def shared_entries(self) -> dict[str, dict]:
        """The codec table of the shared delta a merge method wrote ({} when there is none)."""
        merge = self.manifest.get("merge") or {}
        return merge.get("tensors", {})

    def shared_parts(self, tensor: str) -> dict[str, Tensor]:
        """The stored tensors of the shared delta of one base tensor, by part name."""
        if tensor not in self.shared_entries():
            raise PackError(f"{self.path}: the shared delta has no tensor '{tensor}'")
        if mf.SHARED_FILE not in self._files:
            self._files[mf.SHARED_FILE] = self.check_file(mf.SHARED_FILE, self._verify_files)
        f = self._files[mf.SHARED_FILE]
        prefix = tensor + PART_SEP
        return {k[len(prefix) :]: f.get(k) for k in f.keys() if k.startswith(prefix)}

    def heads(self, task: str) -> dict[str, Tensor]:
        """The task's head tensors (present in the fine-tune, not in the base), by name."""
        table = self.manifest["tasks"][task].get("heads", {}) if task in self.tasks else {}
        if not table:
            return {}
        f = self.task_file(task)
        out = {}
        for name, h in table.items():
            key = part_key(name, "head")
            if key not in f.keys():
                raise PackError(f"{f.path}: head tensor '{name}' is missing")
            t = f.get(key)
            if list(t.shape) != h["shape"]:
                raise PackError(
                    f"{f.path}: head tensor '{name}' has shape {list(t.shape)}, the "
                    f"manifest says {h['shape']}"
                )
            out[name] = t
        return out

    def labels(self, task: str) -> list[str] | None:
        return self.manifest["tasks"][task].get("labels")

    def leftover_dirs(self) -> list[str]:
        """Hidden directories beside the pack that a killed writer left (`.<name>.<tag>-<pid>-
        <hex>`, built by `staged_dir`), and fragment directories in it that a killed
        distributed add-task left (`.fragments-<pid>-<hex>`), whose process no longer runs."""
        out = []
        beside = list(self.path.parent.glob(f".{self.path.name}.*"))
        for p in beside + list(self.path.glob(f"{mf.FRAGMENTS_DIR}-*")):
            m = _STAGED.search(p.name)
            if m and p.is_dir() and not _alive(int(m.group(1))):
                out.append(str(p))
        return sorted(out)

    def stray_files(self) -> list[str]:
        """Files under tasks/ that the manifest does not name (left by an interrupted write)."""
        listed = set(self.manifest["files"])
        # a name that is not UTF-8 is shown with its bytes escaped, so it can be printed
        found = (
            "tasks/" + p.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            for p in (self.path / "tasks").glob("*")
        )
        return sorted(f for f in found if f not in listed)
