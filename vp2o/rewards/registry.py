"""The reward registry: names (or dotted paths) to safe reward callables.

A reward is a callable `(prompt: str, completion: str, sample: dict) -> float` in [0, 1], where
`sample` is the dataset row. Every callable handed out by `get_reward` is wrapped by `safe_reward`:
inputs of the wrong type are coerced (bytes decoded, None to "" / {}), an exception or a
non-finite value scores 0.0 (with a warning naming the reward and the exception type), and the
value is clamped to [0, 1]. So one broken sample never stops a run.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from vp2o.registry import Registry

__all__ = [
    "REWARDS",
    "RewardFn",
    "available",
    "get_reward",
    "register_reward",
    "safe_reward",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

REWARDS: Registry[RewardFn] = Registry("reward")
"""Registered rewards by name, each wrapped by `safe_reward`; filled by `register_reward`."""


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def safe_reward(fn: RewardFn, name: str | None = None) -> RewardFn:
    """Wrap `fn` so that it never raises and always returns a float in [0, 1].

    Args:
        fn: The raw reward callable.
        name: Name used in log messages (defaults to the function's qualified name).

    Returns:
        A callable with the same signature; the raw one stays reachable as `__wrapped__`.
    """
    label = name or getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    def wrapper(prompt: Any, completion: Any, sample: Any = None) -> float:
        try:
            row = sample if isinstance(sample, Mapping) else {}
            value = float(fn(_as_text(prompt), _as_text(completion), row))
        except Exception as err:  # noqa: BLE001 - a reward must never stop the run
            logger.warning("reward %r raised %s; scoring 0.0", label, type(err).__name__)
            return 0.0
        if not math.isfinite(value):
            logger.warning("reward %r returned %r; scoring 0.0", label, value)
            return 0.0
        return min(1.0, max(0.0, value))

    wrapper.reward_name = label  # type: ignore[attr-defined]
    return wrapper


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward callable under `name`.

    The registry stores the `safe_reward` wrapper; the decorator returns the callable unchanged, so
    it can still be called (and tested) raw.

    Args:
        name: Registry key, e.g. "math".

    Raises:
        ValueError: If `name` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        REWARDS.add(name, safe_reward(fn, name))
        return fn

    return decorator


def available() -> list[str]:
    """Sorted names of the registered rewards."""
    return list(REWARDS.names())


def _import_dotted(path: str) -> Any:
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward path {path!r} must look like 'pkg.module:fn' or 'pkg.module.fn'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # missing, or user code that fails while it is imported
        raise ValueError(
            f"cannot import module {module_name!r} for reward {path!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from err
    return obj


def get_reward(name: str) -> RewardFn:
    """The safe reward callable for a registered name or a dotted path.

    Args:
        name: A registered name (see `available()`), or a dotted path to a callable,
            "pkg.module:fn" or "pkg.module.fn".

    Returns:
        `(prompt, completion, sample) -> float` in [0, 1] that never raises.

    Raises:
        ValueError: If `name` is neither registered nor a dotted path (the message lists the
            known names), or a dotted path cannot be imported or does not name a callable.
    """
    if name in REWARDS:
        return REWARDS[name]
    if isinstance(name, str) and ("." in name or ":" in name):
        fn = _import_dotted(name)
        if not callable(fn):
            raise ValueError(f"reward path {name!r} names a {type(fn).__name__}, not a callable")
        return safe_reward(fn, name)
    raise ValueError(
        f"unknown reward {name!r}; choose one of: {', '.join(available())} "
        "(or give a dotted path 'pkg.module:fn')"
    )
