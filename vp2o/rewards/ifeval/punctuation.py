"""IFEval `punctuation:no_comma`: no commas at all."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import Instruction, register_instruction

__all__ = ["NoComma"]

_COMMAS = (",", "\uff0c")  # ASCII and full-width comma


@register_instruction("punctuation:no_comma")
class NoComma(Instruction):
    """Do not use any commas."""

    def check(self, response: str) -> bool:
        """Whether the response contains no comma."""
        return not any(c in response for c in _COMMAS)
