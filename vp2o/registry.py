"""Name -> entry registries filled at import (house style: no if/elif ladders).

One helper for every registry in vp2o: policy losses, KL estimators and aggregations
(`vp2o.algo.grpo`), ESS levels (`vp2o.algo.trust_region`), rewards (`vp2o.rewards`), IFEval
instructions, tokenizer kinds (`vp2o.data.tokenizer`), benchmark formats (`vp2o.eval_formats`),
tensor layouts and model families (`vp2o.convert`). A leaf module: it imports nothing from vp2o, so
every layer can use it.

A second entry under a registered name raises `ValueError` at import; an unknown name raises
(`ValueError`, or the registry's own error type) naming the kind, the name and the registered
names. Look a name up once, at set-up, and keep the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

V = TypeVar("V")


class Registry(Generic[V]):
    """A read-only `name -> entry` mapping filled by `add` or the `@register(name)` decorator.

    Iteration follows registration order; `names()` is sorted. Unlike `dict.get`, `get` (and
    `registry[name]`) raise for an unknown name.

    Args:
        kind: What the entries are ("KL estimator", "tensor layout", ...), for error messages.
        error: Exception type raised for an unknown name (a `ValueError` subclass, e.g. the
            converter's `ConvertError`); duplicates always raise `ValueError`.
    """

    def __init__(self, kind: str, *, error: type[ValueError] = ValueError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, V] = {}

    def add(self, name: str, entry: V) -> V:
        """Register `entry` under `name` and return it; a name already registered raises."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[V], V]:
        """Decorator form of `add`: `@registry.register("name")` returns the entry unchanged."""

        def deco(entry: V) -> V:
            return self.add(name, entry)

        return deco

    def get(self, name: str) -> V:
        """The entry registered under `name`; raises `self.error` listing the registered names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise self.error(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._entries))

    def values(self) -> list[V]:
        """The entries, in registration order."""
        return list(self._entries.values())

    def remove(self, name: str) -> None:
        """Drop `name` (for tests that register a temporary entry); absent names are ignored."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> V:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable name is not registered
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
