"""What every patched layer of one model shares: the task list, the merged-weight cache and
the execution mode."""

from __future__ import annotations

from dataclasses import dataclass

from qmerge.errors import ConfigError
from qmerge.nn.cache import MergedCache

MODES = ("auto", "fused", "materialized")


@dataclass
class Runtime:
    """mode: 'fused' always applies residuals per row (nothing materialized); 'materialized'
    builds the merged weight of a batch whose rows all use one task or one mixture (a mixed
    batch still runs fused); 'auto' materializes a uniform batch of at least `min_rows` rows
    (prefill of a batch of one task) and runs everything else fused (decoding, mixed batches)."""

    tasks: tuple[str, ...]
    cache: MergedCache
    mode: str = "auto"
    min_rows: int = 64
    sort_batches: bool = True  # run a mixed batch's sequences grouped by task (patch.py)

    def __post_init__(self):
        self.set_mode(self.mode)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def materialize(self, rows: int) -> bool:
        return self.mode == "materialized" or (self.mode == "auto" and rows >= self.min_rows)
