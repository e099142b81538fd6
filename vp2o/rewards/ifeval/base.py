"""The instruction interface and registry of the IFEval checkers.

An instruction is a small class: its constructor takes the row's kwargs for it (the public IFEval
names, e.g. `num_words` and `relation`), validates them (raising `ValueError` / `TypeError` on a
malformed row), and `check(response)` says whether a response follows it. Classes register under
their IFEval instruction id with `@register_instruction("group:name")`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from vp2o.registry import Registry

__all__ = [
    "INSTRUCTIONS",
    "Instruction",
    "build_instruction",
    "check_relation",
    "compare",
    "register_instruction",
    "to_int",
]

RELATIONS = ("less than", "at least")


class Instruction:
    """Base class of an IFEval instruction checker."""

    id: ClassVar[str] = ""
    """The IFEval instruction id, set by `register_instruction`."""

    def check(self, response: str) -> bool:
        """Whether `response` follows this instruction."""
        raise NotImplementedError


InstructionT = TypeVar("InstructionT", bound=type[Instruction])

INSTRUCTIONS: Registry[type[Instruction]] = Registry("instruction")
"""Instruction classes by IFEval id; filled by `register_instruction`."""


def register_instruction(instruction_id: str) -> Callable[[InstructionT], InstructionT]:
    """Class decorator registering an `Instruction` subclass under `instruction_id`.

    Raises:
        ValueError: If the id is already registered or is not of the form "group:name".
    """
    if not re.fullmatch(r"[a-z_]+:[a-z_0-9]+", instruction_id):
        raise ValueError(f"instruction id {instruction_id!r} must look like 'group:name'")

    def decorator(cls: InstructionT) -> InstructionT:
        INSTRUCTIONS.add(instruction_id, cls)
        cls.id = instruction_id
        return cls

    return decorator


def build_instruction(instruction_id: str, kwargs: Mapping[str, Any] | None) -> Instruction:
    """Instantiate the checker for `instruction_id` with the row's kwargs (None values dropped).

    Raises:
        ValueError: If the id is unknown (the message lists the known ids) or the kwargs are bad.
        TypeError: If a required kwarg is missing or an unexpected one is given.
    """
    cls = INSTRUCTIONS.get(instruction_id)
    args = {k: v for k, v in (kwargs or {}).items() if v is not None}
    return cls(**args)


def to_int(value: Any, name: str, minimum: int = 0) -> int:
    """`value` as an int >= `minimum` (accepts 3, 3.0 and "3"); raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number != value and str(number) != str(value).strip():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_relation(relation: Any, name: str = "relation") -> str:
    """`relation` if it is "less than" or "at least"; raises ValueError otherwise."""
    if relation not in RELATIONS:
        raise ValueError(f"{name} must be one of {RELATIONS}, got {relation!r}")
    return relation


def compare(count: int, relation: str, target: int) -> bool:
    """`count < target` for "less than", `count >= target` for "at least"."""
    return count < target if relation == "less than" else count >= target
