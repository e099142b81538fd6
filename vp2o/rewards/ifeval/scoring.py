"""IFEval scoring: strict and loose following of every instruction of a row.

Strict: the response as it is must follow the instruction. Loose (as in IFEval): the instruction
counts as followed if any of eight variants follows it: the response, without its first line,
without its last line, without both, and each of these four with every `*` removed (markdown
emphasis). A response that is empty after stripping follows nothing.

A row names its instructions in `instruction_id_list` and gives one kwargs dict per instruction in
`kwargs` (the public IFEval format; `None` values, which the Hugging Face copy uses to pad every
dict to the same keys, are dropped). An unknown id or malformed kwargs make that instruction count
as not followed, with a warning (once per id and problem).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vp2o.rewards.ifeval.base import Instruction, build_instruction

__all__ = ["IfevalResult", "evaluate", "loose_variants", "row_instructions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IfevalResult:
    """Per-instruction outcome of one response.

    Attributes:
        instruction_ids: The row's instruction ids, in order.
        strict: Whether each instruction is followed (strict).
        loose: Whether each instruction is followed (loose).
    """

    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def strict_fraction(self) -> float:
        """Instruction-level strict accuracy of this response (0.0 with no instructions)."""
        return sum(self.strict) / len(self.strict) if self.strict else 0.0

    @property
    def loose_fraction(self) -> float:
        """Instruction-level loose accuracy of this response (0.0 with no instructions)."""
        return sum(self.loose) / len(self.loose) if self.loose else 0.0

    @property
    def prompt_strict(self) -> bool:
        """Prompt-level strict accuracy: every instruction followed."""
        return bool(self.strict) and all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        """Prompt-level loose accuracy: every instruction followed (loose)."""
        return bool(self.loose) and all(self.loose)


@functools.cache
def _warn_once(instruction_id: str, problem: str) -> None:
    logger.warning("IFEval instruction %r counts as not followed: %s", instruction_id, problem)


def row_instructions(
    instruction_ids: Sequence[str], kwargs_list: Sequence[Mapping[str, Any] | None] | None
) -> list[Instruction | None]:
    """Build the checkers of a row; None where the id is unknown or its kwargs are malformed."""
    kwargs_list = list(kwargs_list or [])
    built: list[Instruction | None] = []
    for i, instruction_id in enumerate(instruction_ids):
        kwargs = kwargs_list[i] if i < len(kwargs_list) else None
        if kwargs is not None and not isinstance(kwargs, Mapping):
            _warn_once(str(instruction_id), f"kwargs must be a dict, got {type(kwargs).__name__}")
            built.append(None)
            continue
        try:
            built.append(build_instruction(str(instruction_id), kwargs))
        except (TypeError, ValueError) as err:
            _warn_once(str(instruction_id), str(err)[:300])
            built.append(None)
    return built


def loose_variants(response: str) -> list[str]:
    """The eight loose-scoring variants of `response` (see the module docstring)."""
    lines = response.split("\n")
    base = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return base + [v.replace("*", "") for v in base]


def _follows(instruction: Instruction | None, response: str) -> bool:
    if instruction is None or not response.strip():
        return False
    try:
        return bool(instruction.check(response))
    except Exception as err:  # noqa: BLE001 - a checker bug must not stop scoring
        _warn_once(instruction.id, f"checker raised {type(err).__name__}")
        return False


def evaluate(
    response: str,
    instruction_ids: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    loose: bool = True,
) -> IfevalResult:
    """Strict (and, if `loose`, loose) following of each instruction by `response`.

    Args:
        response: The model's response.
        instruction_ids: IFEval instruction ids, e.g. ["punctuation:no_comma"].
        kwargs_list: One kwargs dict per instruction (missing ones count as empty).
        loose: Also compute loose scores (else `loose` repeats `strict`).
    """
    instructions = row_instructions(instruction_ids, kwargs_list)
    strict = tuple(_follows(ins, response) for ins in instructions)
    if loose:
        variants = loose_variants(response)
        loose_scores = tuple(
            s or any(_follows(ins, v) for v in variants[1:])
            for ins, s in zip(instructions, strict, strict=True)
        )
    else:
        loose_scores = strict
    return IfevalResult(tuple(map(str, instruction_ids)), strict, loose_scores)
