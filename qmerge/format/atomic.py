"""Atomic writes: a file or a whole directory appears complete or not at all.

A file is written to a temporary name in the same directory, flushed, fsync'ed, renamed over
the target (`os.replace` is atomic on POSIX), and the directory is fsync'ed so the rename itself
survives a power cut. A directory is built under a temporary name and swapped in with
`renameat2(RENAME_EXCHANGE)` where the kernel has it (one atomic step), else two renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name next to `path`, on the same file system (so rename is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; on a clean exit it replaces `path` atomically, on an exception
    the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = temp_sibling(path)
    f = open(tmp, "xb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, and on a full disk that fails
            f.close()  # too: the temporary file must go all the same
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one atomic step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def install_dir(staged: Path, target: Path) -> None:
    """Moves the complete directory `staged` to `target`, replacing what is there.

    With an existing `target` the two are exchanged atomically where the kernel supports it
    (readers see the old or the new directory, never neither), then the old one is deleted.
    """
    fsync_dir(staged)
    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged)  # `staged` now holds the old directory
    else:
        old = temp_sibling(target, "old")
        os.rename(target, old)
        os.rename(staged, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)


@contextlib.contextmanager
def staged_dir(target: Path, tag: str = "tmp") -> Iterator[Path]:
    """Yields a new hidden directory beside `target` to build into; on a clean exit it is
    installed as `target` (install_dir), on an exception it is removed and `target` is
    untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = temp_sibling(target, tag)
    staged.mkdir()
    try:
        yield staged
        install_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
