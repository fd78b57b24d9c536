"""A merged pack's shared delta, added into the model's own parameters (the backbone every task
and the bare `base` route then share), and taken out again by `unload`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qmerge.codecs import Residual
from qmerge.errors import ConfigError
from qmerge.format.names import alignment
from qmerge.format.pack import Pack


class Backbone:
    """The parameters the shared delta changed, with their original tensors for `restore`."""

    def __init__(self) -> None:
        self._changed: list[tuple[nn.Parameter, Tensor]] = []

    def add(self, model: nn.Module, pack: Pack, shared: Callable[[str], Residual]) -> None:
        """Each parameter the shared delta names gets a new tensor W0 + shared (fp32 sum,
        rounded once); the original stays for `restore`, so this costs one copy of those
        parameters. A shared delta that is not finite is refused before any weight changes
        (and any change made so far is undone)."""
        names = set(pack.shared_entries())
        if not names:
            return
        params = list(model.named_parameters(remove_duplicate=False))
        _, rename = alignment([n for n, _ in params], set(pack.base_fingerprint["tensors"]))
        found: set[str] = set()
        try:
            for n, p in params:
                name = rename(n)
                if name not in names or name in found:
                    continue
                if not p.is_floating_point():
                    raise ConfigError(
                        f"{pack.path}: is a merged pack whose shared delta "
                        f"changes '{name}', which this model holds quantized "
                        f"({p.dtype}); load the base in a float dtype"
                    )
                d = shared(name).dequantize(torch.float32).reshape(p.shape).to(p.device)
                if not bool(torch.isfinite(d).all()):
                    raise ConfigError(
                        f"{pack.path}: the shared delta of '{name}' is not "
                        f"finite (NaN or Inf); the model was left unchanged"
                    )
                merged = (p.data.float() + d).to(p.dtype)
                if not bool(torch.isfinite(merged).all()):
                    raise ConfigError(
                        f"{pack.path}: adding the shared delta of '{name}' "
                        f"overflows {p.dtype}; the model was left unchanged"
                    )
                self._changed.append((p, p.data))
                p.data = merged
                found.add(name)
        except BaseException:
            self.restore()
            raise
        if missing := sorted(names - found):
            self.restore()
            raise ConfigError(
                f"{pack.path}: the shared delta changes '{missing[0]}', which the "
                f"model does not have"
            )

    def restore(self) -> None:
        for p, orig in reversed(self._changed):
            p.data = orig
        self._changed.clear()
