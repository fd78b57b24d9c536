"""Progress bars for the verbs' long loops (tqdm, on stderr, only where stderr is a terminal)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
Progress = Callable[[Iterable[T]], Iterable[T]]


def bar(
    items: Iterable[T], enabled: bool, desc: str, total: int | None = None, unit: str = "tensor"
) -> Iterable[T]:
    """`items` wrapped in a progress bar when enabled and stderr is a terminal."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(
        items, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, disable=None
    )


def bars(enabled: bool, desc: str, unit: str = "tensor") -> Progress:
    """A `progress` callable for the verbs that take one."""
    return lambda items: bar(items, enabled, desc, unit=unit)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars off (a "Loading weights" bar per model load drowns
    qmerge's bars, which say what is running), as they were afterwards."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
