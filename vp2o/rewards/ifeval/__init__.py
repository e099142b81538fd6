"""IFEval instruction checkers and the `ifeval` / `ifeval_loose` rewards.

Every instruction id of the public IFEval set is a small `Instruction` class registered in
`INSTRUCTIONS`; `evaluate` scores a response strictly and loosely. The rewards read a row's
`instruction_id_list` and `kwargs` and return the fraction of instructions followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vp2o.rewards.ifeval import (  # noqa: F401 - importing registers the instructions
    case,
    combination,
    content,
    formats,
    keywords,
    language,
    length,
    punctuation,
    startend,
)
from vp2o.rewards.ifeval.base import INSTRUCTIONS, Instruction, build_instruction
from vp2o.rewards.ifeval.scoring import IfevalResult, evaluate, loose_variants
from vp2o.rewards.registry import register_reward

__all__ = [
    "INSTRUCTIONS",
    "IfevalResult",
    "Instruction",
    "build_instruction",
    "evaluate",
    "ifeval_loose_reward",
    "ifeval_reward",
    "loose_variants",
]


def _row(sample: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    ids = sample.get("instruction_id_list") or []
    kwargs = sample.get("kwargs") or []
    if isinstance(ids, str) or not isinstance(ids, list | tuple):
        return [], []
    if not isinstance(kwargs, list | tuple):
        kwargs = []
    return list(ids), list(kwargs)


@register_reward("ifeval")
def ifeval_reward(prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
    """Fraction of the row's instructions that `completion` follows (strict)."""
    ids, kwargs = _row(sample)
    return evaluate(completion, ids, kwargs, loose=False).strict_fraction if ids else 0.0


@register_reward("ifeval_loose")
def ifeval_loose_reward(prompt: str, completion: str, sample: Mapping[str, Any]) -> float:
    """Fraction of the row's instructions that `completion` follows (loose)."""
    ids, kwargs = _row(sample)
    return evaluate(completion, ids, kwargs, loose=True).loose_fraction if ids else 0.0
