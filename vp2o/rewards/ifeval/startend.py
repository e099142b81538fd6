"""IFEval `startend:*`: end with a given phrase; wrap the whole response in double quotes."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import Instruction, register_instruction

__all__ = ["EndChecker", "Quotation"]

_QUOTE_PAIRS = (('"', '"'), ("\u201c", "\u201d"))


@register_instruction("startend:end_checker")
class EndChecker(Instruction):
    """Finish the response with exactly `end_phrase`; nothing may follow it."""

    def __init__(self, end_phrase: str) -> None:
        if not isinstance(end_phrase, str) or not end_phrase.strip():
            raise ValueError(f"end_phrase must be a non-empty string, got {end_phrase!r}")
        self.end_phrase = end_phrase.strip()

    def check(self, response: str) -> bool:
        """Whether the stripped response ends with the phrase (case-insensitive)."""
        return response.strip().lower().endswith(self.end_phrase.lower())


@register_instruction("startend:quotation")
class Quotation(Instruction):
    """Wrap the entire response in double quotation marks."""

    def check(self, response: str) -> bool:
        """Whether the stripped response starts and ends with a double quote."""
        text = response.strip()
        return len(text) > 1 and any(
            text.startswith(a) and text.endswith(b) for a, b in _QUOTE_PAIRS
        )
