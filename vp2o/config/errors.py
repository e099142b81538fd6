"""The one error type of the configuration, and the one way its checks raise it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or inconsistent.

    ``key`` is the dotted key the message is about (None when it is about no single key), so
    that the loader can say which file and line set it.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def expect(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``ConfigError("key = value: expected ...")`` unless ``ok``.

    Every check of the configuration goes through here, so every message names the key, the
    value and what was expected, with how to fix it where there is a choice.
    """
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}", key=key)
