"""Name -> function registries filled by a decorator (house style: no if/elif ladders).

Duplicate names raise at import; unknown names raise with the list of known ones. Look a name up
once, at set-up, and keep the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A `dict[str, F]` filled by `@registry.register("name")`.

    Args:
        kind: What the entries are ("KL estimator", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name`; a second function under the same name raises."""

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The function registered under `name`; raises `ValueError` listing the known names."""
        try:
            return self._fns[name]
        except KeyError:
            known = ", ".join(sorted(self._fns))
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._fns))

    def __contains__(self, name: object) -> bool:
        return name in self._fns
