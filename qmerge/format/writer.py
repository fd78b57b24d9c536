"""The pack writer: the only code that creates or changes a manifest or names a pack file
(shared/DESIGN.md, "The pack"). Every verb that writes a pack goes through a transaction here.

    with PackWriter.create(out, base_fingerprint) as w:   # a new pack, built beside `out`
        w.put_task("math", tensors, {"source": ..., "tensors": table})
        w.set_shared(tensors, merge_entry)
    with PackWriter.edit(path) as w:                      # an existing pack, under its lock
        w.remove_task("code"); w.set_router(tensors, entry)

On a clean exit the manifest is written last (temp file, fsync, rename); a new pack is then
swapped in whole. On an exception nothing the old manifest names has changed: a new pack's
directory is dropped, files an edit added are deleted, files it removes are deleted only after
the new manifest is in place.

Fragments: the files of one transaction may be written by other processes (workers of a
distributed compress). `write_task_file(w.staging, task, tensors)` runs anywhere that sees
`w.staging` and returns a `Fragment` (plain data: the file, its size and sha256); the
coordinator `adopt_task(fragment, entry)` checks the file against it and records it. Workers
that each encode a group of tensors for every task write their pieces with `write_fragment`
into a scratch directory (`w.fragments()`, inside the staging area, removed when the block
ends); the coordinator reads them back with `open_fragment`, which checks each against what
its worker reported, and puts the task whole. Only the coordinator's commit writes the
manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from qmerge.errors import ChecksumError, PackError
from qmerge.format import manifest as mf
from qmerge.format.atomic import atomic_file, atomic_write_bytes, staged_dir
from qmerge.format.safetensors_io import SafetensorsFile, sha256_file, write_safetensors
from qmerge.version import GENERATOR

LOCK = ".lock"


@dataclass(frozen=True)
class Fragment:
    """A file written into a transaction's staging directory: its path relative to the pack,
    size and sha256 (what a worker hands back to the coordinator)."""

    rel: str
    bytes: int
    sha256: str


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on a pack directory while it is being changed.

    `create(overwrite=True)` swaps a new directory in while it holds the old one's lock, so a
    writer that waited on that lock wakes holding the lock of a directory that is gone: it
    sees the lock file at `path` is another file now, and takes that one instead."""
    while True:
        try:  # O_NOFOLLOW: a link planted as the lock never makes a file outside the pack
            fd = os.open(path / LOCK, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise PackError(
                f"{path / LOCK}: cannot open the pack's lock: {e.strerror or e}"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(path / LOCK, follow_symlinks=False).st_ino
        except OSError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # stale: the directory was replaced while this writer waited
    try:
        yield
    finally:
        os.close(fd)


def _write(
    staging: Path, rel: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> Fragment:
    target = staging / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as f:
        nbytes, sha = write_safetensors(f, tensors, metadata)
    return Fragment(rel, nbytes, sha)


def write_task_file(
    staging: Path,
    task: str,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Fragment:
    """Writes one task's residuals as tasks/<task>.safetensors under `staging`, atomically.
    Safe to call from a worker process; nothing is recorded until the coordinator adopts it."""
    mf.check_new_task_name(task)
    meta = {
        "qmerge.format": "task",
        "qmerge.format_version": str(mf.FORMAT_VERSION),
        "qmerge.task": task,
        **(metadata or {}),
    }
    return _write(staging, mf.task_file(task), tensors, meta)


def write_fragment(
    directory: str | os.PathLike,
    rel: str,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Fragment:
    """Writes a piece of a pack file (some tensors of one task, or of the shared delta) as
    `rel` under a `PackWriter.fragments()` directory, atomically; safe in any process. Writing
    it again (a retried worker) replaces it with the same bytes."""
    return _write(Path(directory), rel, tensors, {"qmerge.format": "fragment", **(metadata or {})})


def check_fragment(directory: str | os.PathLike, fragment: Fragment) -> Path:
    """The fragment's file, after checking it is the one its writer reported (size, sha256)."""
    p = Path(directory) / fragment.rel
    try:
        size = p.stat().st_size
    except OSError:
        raise ChecksumError(f"{p}: the fragment's file is missing") from None
    if size != fragment.bytes or sha256_file(p) != fragment.sha256:
        raise ChecksumError(
            f"{p}: differs from the fragment that reported it "
            f"({fragment.bytes} bytes, sha256 {fragment.sha256[:16]}...)"
        )
    return p


def open_fragment(directory: str | os.PathLike, fragment: Fragment) -> SafetensorsFile:
    """A checked fragment, memory-mapped (its tensors are views of the file's pages)."""
    return SafetensorsFile(check_fragment(directory, fragment), error=ChecksumError)


class PackWriter:
    """One transaction on one pack (see the module docstring). Use `create` or `edit`."""

    def __init__(self, manifest: dict, staging: Path, new: bool):
        self.manifest = manifest
        self.staging = staging  # where new files go: the staged directory, or the pack itself
        self._new = new
        self._added: list[Path] = []  # files this edit wrote (dropped if it fails)
        self._dropped: list[Path] = []  # files to delete once the new manifest is in place

    @classmethod
    @contextlib.contextmanager
    def create(
        cls, out: str | os.PathLike, base_fingerprint: dict, *, overwrite: bool = False
    ) -> Iterator[PackWriter]:
        """A new pack at `out`, built in a hidden sibling directory and swapped in whole.

        An existing pack at `out` is replaced only with `overwrite` (under its lock, so no
        edit of it is lost half-way); an existing directory that is not a pack and not empty
        is refused."""
        out = Path(out)
        is_pack = (out / mf.NAME).is_file()
        if out.exists():
            if not out.is_dir():
                raise PackError(f"{out}: exists and is not a directory")
            if not is_pack and any(out.iterdir()):
                raise PackError(
                    f"{out}: exists, is not empty and is not a pack; refusing to replace it"
                )
            if is_pack and not overwrite:
                raise PackError(
                    f"{out}: a pack already exists; pass --overwrite to replace it, or use add-task"
                )
        lock = locked(out) if is_pack else contextlib.nullcontext()
        with lock, staged_dir(out) as staged:
            w = cls(mf.new(base_fingerprint, GENERATOR), staged, new=True)
            yield w
            w._commit()

    @classmethod
    @contextlib.contextmanager
    def edit(cls, path: str | os.PathLike) -> Iterator[PackWriter]:
        """The pack at `path`, changed in place under its lock; its manifest is read after the
        lock is taken, so concurrent edits are serialised."""
        from qmerge.format.pack import Pack  # the reader validates the manifest

        path = Path(path)
        Pack.open(path)  # a clear error if it is not a pack, before creating a lock file
        with locked(path):
            w = cls(Pack.open(path).manifest, path, new=False)
            try:
                yield w
                w._commit()
            except BaseException:
                for p in w._added:
                    p.unlink(missing_ok=True)
                raise
            for p in w._dropped:
                p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def fragments(self) -> Iterator[Path]:
        """A scratch directory inside the staging area for the fragments of one distributed
        step (`write_fragment`). It is removed when the block ends, whatever happens, so the
        committed pack never holds it and a failed edit leaves nothing in the live pack."""
        d = self.staging / f"{mf.FRAGMENTS_DIR}-{os.getpid()}-{secrets.token_hex(4)}"
        d.mkdir()
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # --- tasks ---------------------------------------------------------------------------

    def put_task(
        self,
        task: str,
        tensors: Mapping[str, Tensor],
        entry: Mapping[str, Any],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Writes a task's file and records it. `entry` is the task's manifest entry without
        "file" ({"source", "tensors", and optionally "heads", "labels"})."""
        self._free(task)  # before writing: the file of a task the pack has is never touched
        self._record(write_task_file(self.staging, task, tensors, metadata), task, entry)

    def _free(self, task: str) -> None:
        if task in self.manifest["tasks"]:
            raise PackError(f"{self.staging}: already has task {task!r}; remove-task it first")

    def adopt_task(self, fragment: Fragment, task: str, entry: Mapping[str, Any]) -> None:
        """Records a task file written by `write_task_file` (possibly by another process),
        after checking it is the file the fragment describes (size and sha256). A coordinator
        hands workers only names the pack does not have (`manifest["tasks"]`)."""
        mf.check_new_task_name(task)
        if fragment.rel != mf.task_file(task):
            raise PackError(f"fragment {fragment.rel} is not the file of task {task!r}")
        self._free(task)  # before the file is claimed: a live task's file is never dropped
        if not self._new:  # written into the live pack: dropped if this edit fails
            self._added.append(self.staging / fragment.rel)
        self._check(fragment)
        self._record(fragment, task, entry)

    def _record(self, fragment: Fragment, task: str, entry: Mapping[str, Any]) -> None:
        """Names a checked file in the manifest (the caller checked `task` is free)."""
        if not self._new and self.staging / fragment.rel not in self._added:
            self._added.append(self.staging / fragment.rel)
        self.manifest["files"][fragment.rel] = {"sha256": fragment.sha256, "bytes": fragment.bytes}
        self.manifest["tasks"][task] = {**entry, "file": fragment.rel}

    def remove_task(self, task: str) -> None:
        if task not in self.manifest["tasks"]:
            raise PackError(
                f"{self.staging}: has no task {task!r} (tasks: "
                f"{', '.join(sorted(self.manifest['tasks'])) or 'none'})"
            )
        rel = self.manifest["tasks"].pop(task)["file"]
        del self.manifest["files"][rel]
        self._dropped.append(self.staging / rel)

    # --- shared delta and router ---------------------------------------------------------

    def set_shared(
        self,
        tensors: Mapping[str, Tensor],
        entry: dict[str, Any],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """The merge entry and, when it has tensors, shared.safetensors."""
        entry = dict(entry)
        if tensors:
            meta = {"qmerge.format": "shared", **(metadata or {})}
            frag = _write(self.staging, mf.SHARED_FILE, tensors, meta)
            self.manifest["files"][mf.SHARED_FILE] = {"sha256": frag.sha256, "bytes": frag.bytes}
            entry["file"] = mf.SHARED_FILE
        self.manifest["merge"] = entry

    def set_router(self, tensors: Mapping[str, Tensor], entry: dict[str, Any]) -> dict:
        """Stores a router (replacing any): router.safetensors and the manifest's "router"
        entry (to which "file" is added); returns that entry."""
        if unknown := [t for t in entry.get("tasks", []) if t not in self.manifest["tasks"]]:
            raise PackError(
                f"{self.staging}: the router names task {unknown[0]!r}, which the "
                f"pack does not have"
            )
        frag = _write(
            self.staging,
            mf.ROUTER_FILE,
            tensors,
            {"qmerge.format": "router", "kind": str(entry.get("kind", ""))},
        )
        self.manifest["files"][mf.ROUTER_FILE] = {"sha256": frag.sha256, "bytes": frag.bytes}
        self.manifest["router"] = {**entry, "file": mf.ROUTER_FILE}
        return self.manifest["router"]

    def clear_router(self) -> None:
        self.manifest["router"] = None
        if self.manifest["files"].pop(mf.ROUTER_FILE, None) is not None:
            self._dropped.append(self.staging / mf.ROUTER_FILE)

    # --- commit --------------------------------------------------------------------------

    def _check(self, fragment: Fragment) -> None:
        check_fragment(self.staging, fragment)

    def _commit(self) -> None:
        atomic_write_bytes(self.staging / mf.NAME, mf.dumps(mf.validate(self.manifest)))
