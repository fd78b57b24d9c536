"""One registry helper for everything qmerge looks up by name: codecs, merge methods, routers
and export formats. An entry keeps its name, a one-line summary and the paper (or format
documentation) it implements, so the CLI's choices and --help, and the README tables, come
from the registries: adding a method is one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from qmerge.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    item: T
    summary: str = ""
    paper: str = ""


class Registry(Mapping[str, T]):
    """name -> item, read like a dict; `lookup` is the checked access for user input."""

    def __init__(self, what: str):
        self.what = what  # "codec", "merge method", ... (in error messages)
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, item: T, summary: str = "", paper: str = "") -> T:
        """Adds `item` as `name`; a name already taken is refused (ConfigError)."""
        if not isinstance(name, str) or not name or name != name.strip() or ":" in name:
            raise ConfigError(f"{self.what} name {name!r} is not valid")
        if name in self._entries:
            raise ConfigError(f"{self.what} {name!r} is already registered")
        self._entries[name] = Entry(name, item, summary, paper)
        return item

    def unregister(self, name: str) -> None:
        """Removes `name` (for plugins and tests that register a temporary entry)."""
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def swapped(self, name: str, item: T) -> Iterator[None]:
        """Within the block, `name` (registered) stands for `item` (tests)."""
        old = self.entry(name)
        self._entries[name] = Entry(name, item, old.summary, old.paper)
        try:
            yield
        finally:
            self._entries[name] = old

    def lookup(self, name: str) -> T:
        """The item registered as `name`; ConfigError naming the known ones otherwise."""
        try:
            return self._entries[name].item
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.what} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def entry(self, name: str) -> Entry[T]:
        self.lookup(name)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def help(self, indent: str = "  ") -> str:
        """One line per entry: 'name: summary (paper)', for --help texts."""
        lines = []
        for n in self.names():
            e = self._entries[n]
            lines.append(f"{indent}{n}: {e.summary}" + (f" ({e.paper})" if e.paper else ""))
        return "\n".join(lines)

    def __getitem__(self, name: str) -> T:
        return self._entries[name].item

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
