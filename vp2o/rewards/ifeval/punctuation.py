"""IFEval `punctuation:no_comma`: no commas at all."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import Instruction, register_instruction
from vp2o.rewards.ifeval.text import skeleton

__all__ = ["NoComma"]

# after `skeleton` (NFKC: the full-width and small commas are ","): the comma-like marks of other
# scripts (Arabic, ideographic, the low-9 quote drawn as a comma)
_COMMAS = (",", "\u060c", "\u3001", "\u201a")


@register_instruction("punctuation:no_comma")
class NoComma(Instruction):
    """Do not use any commas."""

    def check(self, response: str) -> bool:
        """Whether the response contains no comma."""
        seen = skeleton(response)
        return not any(c in seen for c in _COMMAS)
