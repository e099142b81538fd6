"""IFEval `combination:*`: two different responses; repeat the request first."""

from __future__ import annotations

from vp2o.rewards.ifeval.base import Instruction, register_instruction

__all__ = ["RepeatPrompt", "TwoResponses"]

SEPARATOR = "******"


@register_instruction("combination:two_responses")
class TwoResponses(Instruction):
    """Give two different responses separated by six asterisks `******`.

    Empty text before the first or after the last separator is ignored; anything else must be
    exactly two non-empty, different responses.
    """

    def check(self, response: str) -> bool:
        """Whether there are exactly two different non-empty parts."""
        parts = [p.strip() for p in response.split(SEPARATOR)]
        while parts and not parts[0]:
            parts.pop(0)
        while parts and not parts[-1]:
            parts.pop()
        return len(parts) == 2 and all(parts) and parts[0] != parts[1]


@register_instruction("combination:repeat_prompt")
class RepeatPrompt(Instruction):
    """First repeat the request word for word (`prompt_to_repeat`), then answer."""

    def __init__(self, prompt_to_repeat: str) -> None:
        if not isinstance(prompt_to_repeat, str) or not prompt_to_repeat.strip():
            raise ValueError(
                f"prompt_to_repeat must be a non-empty string, got {prompt_to_repeat!r}"
            )
        self.prompt_to_repeat = prompt_to_repeat.strip()

    def check(self, response: str) -> bool:
        """Whether the response starts with the request (case-insensitive)."""
        return response.strip().lower().startswith(self.prompt_to_repeat.lower())
