"""Lining up tensor names that differ by a model prefix.

A fine-tune saved from a task model (`BertForSequenceClassification`) names the encoder's
tensors `bert.encoder...` while its base, saved as the bare encoder, says `encoder...`; a
causal LM may say `model.layers...` against a base's `layers...`. `alignment` finds the one
prefix change (strip a leading component, or add one) that maps the most names onto the
reference, applies it where the result is a reference name, and leaves every other name (a
task head, say) as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def _strip(prefix: str) -> Callable[[str], str]:
    return lambda n: n[len(prefix) :] if n.startswith(prefix) else n


def _add(prefix: str) -> Callable[[str], str]:
    return lambda n: prefix + n


def alignment(names: Iterable[str], reference: Iterable[str]) -> tuple[str, Callable[[str], str]]:
    """(description, rename) where rename(name) is the reference's spelling of `name`.

    The identity wins ties, so names that already match are never rewritten."""
    names, ref = list(names), set(reference)
    candidates: list[tuple[str, Callable[[str], str]]] = [("identity", lambda n: n)]
    for p in sorted({n.split(".", 1)[0] + "." for n in names if "." in n}):
        candidates.append((f"strip '{p}'", _strip(p)))
    for p in sorted({r.split(".", 1)[0] + "." for r in ref if "." in r}):
        candidates.append((f"add '{p}'", _add(p)))
    how, f = max(candidates, key=lambda c: sum(c[1](n) in ref for n in names))
    if sum(f(n) in ref for n in names) == sum(n in ref for n in names):
        return candidates[0]
    return how, lambda n: f(n) if f(n) in ref else n
