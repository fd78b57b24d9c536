"""The exceptions qmerge raises for bad input. The CLI prints their message as one line and
exits non-zero; nothing is half-written when one is raised.

    QmergeError
    ├── ConfigError        a codec / policy / argument value that is not valid (also a ValueError)
    │   └── UnknownTask        a route names a task the pack does not have (HTTP 404)
    ├── CheckpointError    an input checkpoint that cannot be read or does not match its base
    ├── PackError          a pack that cannot be used
    │   ├── ChecksumError      a file is truncated or its sha256 differs from the manifest
    │   ├── FormatVersionError the manifest was written by a newer qmerge
    │   └── BaseMismatchError  the pack was made from a different base model
    ├── ExportError        an export that cannot be built, or whose artifact fails its check
    └── DataError          data a command needs is not installed (the demo's task data)
"""

from __future__ import annotations


class QmergeError(Exception):
    """Base class of every error qmerge raises for bad input (not for its own bugs)."""


class ConfigError(QmergeError, ValueError):
    """A configuration value (codec, policy, option) that is not valid."""


class UnknownTask(ConfigError):
    """A route (a task name or a mixture) names a task the pack does not have."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


class CheckpointError(QmergeError):
    """A base or fine-tuned checkpoint that cannot be read, or whose tensors do not match."""


class PackError(QmergeError):
    """A pack (manifest or task file) that cannot be used."""


class ChecksumError(PackError):
    """A pack file that is truncated or whose sha256 differs from the manifest."""


class FormatVersionError(PackError):
    """A manifest with a format_version newer than this qmerge reads."""


class BaseMismatchError(PackError):
    """A pack opened, verified or extended against a base other than the one it was made from."""


class ExportError(QmergeError):
    """An export whose artifact could not be built, or does not match the routed model."""


class DataError(QmergeError):
    """Data a command reads (the demo's task data) is not installed on this machine."""
